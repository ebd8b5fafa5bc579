"""The embedded broker: the one place that joins the semantics and the storage.

Threads: callers (producers, consumers, any number of threads or one event loop) and one
writer thread that owns commits. Everything shared is guarded by one lock; the writer
holds it only to collect and to publish, never across a commit.

Invariants:
1. A durable send is acknowledged (its Ticket completes) only after the commit that
   holds it returned; a message becomes visible to consumers only then, so nothing is
   delivered that a crash could take back.
2. Offsets are assigned under the lock in the order sends arrive, and pending batches
   are committed in that order, so the visible end only grows and the log has no holes.
3. A dead-lettered message is appended to its dead-letter queue in the same commit that
   stores the settle in its group: a crash keeps both or neither.
4. Consumer-group changes (deliveries, acks, failures) are committed by the writer
   within ``ack_linger_s``; losing them to a crash can only cause redelivery.
5. At-most-once queues never touch the writer: they live in memory, and a message is
   removed from its group's buffer before it is returned.
6. After a commit fails, the engine refuses all further work: what was not confirmed
   was not acknowledged, and nothing is retried against a store that failed.
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
import threading
import time
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from arrival import _canary, _crash
from arrival._clock import Clock, SystemClock
from arrival._codec import RecordTuple, decode_batch, encode_batch
from arrival.errors import (
    ArrivalError,
    ClosedError,
    CorruptData,
    InvalidQueueSpec,
    LeaseExpired,
    MessageTooLarge,
    NotSupported,
    StorageError,
    UnknownQueue,
    UsageError,
)
from arrival.model import (
    DEFAULT_DEDUP_WINDOW_S,
    BrokerStats,
    ConsumerStats,
    GroupStats,
    Guarantee,
    Histogram,
    QueueDescription,
    QueueSpec,
    QueueStats,
    StoredMessage,
)
from arrival.semantics.dedup import Duplicate, IdIndex, ProducerTable
from arrival.semantics.delivery import SKIP, DeadLetterAction, GroupState, Key
from arrival.semantics.lossy import LossyBuffer, LossyQueue
from arrival.semantics.spec import (
    check_compatible,
    dead_letter_spec,
    decode_spec,
    describe,
    encode_spec,
    validate_queue_name,
)
from arrival.semantics.transactions import TransactionTable
from arrival.storage.base import GroupRecord, Storage, WriteSet

__all__ = ["DeadMessage", "Delivery", "Engine", "Ticket"]

DLQ_GROUP = "~dlq"  # the group through which a dead-letter queue is listed, replayed, purged
SNAPSHOT_EVERY = 256  # group deltas between snapshots: bounds recovery time and row count
CACHE_MESSAGES = 262_144  # decoded messages kept in memory, all queues together; older
CACHE_BYTES = 64 << 20  # ones are re-read. And at most this many stored bytes of them
FLOOR_TICK_S = 1.0  # retention is kept to this precision; bounds floor_times to one per s
HOUSEKEEPING_S = 0.25  # how often the writer expires leases and trims when idle
CANARY_GAP_S = 0.25  # canaries only: how late the broken step comes (arrival._canary)
DEDUP_EXPIRY_S = 1.0  # how often idle producers and old message ids are forgotten
# upper bounds (s) of the fsync latency histogram's buckets: a local SSD syncs in well
# under a millisecond, a loaded disk or network volume in tens; seconds mean trouble
FSYNC_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# provenance headers of dead-lettered messages
H_ORIGIN_QUEUE = "arrival-origin-queue"
H_ORIGIN_GROUP = "arrival-origin-group"
H_ORIGIN_OFFSET = "arrival-origin-offset"
H_ATTEMPTS = "arrival-attempts"
H_FAILURES = "arrival-failures"
H_FIRST_FAILURE = "arrival-first-failure"
H_LAST_FAILURE = "arrival-last-failure"
H_LAST_ERROR = "arrival-last-error"
H_REASON = "arrival-dead-letter-reason"
H_DEAD_AT = "arrival-dead-lettered-at"
H_REPLAY_GROUP = "arrival-replay-group"  # a replayed message goes to this group only
H_REPLAYS = "arrival-replays"
H_QUARANTINED = "arrival-quarantined"  # when a replay held the letter back (the loop guard)
_DEAD_LETTER_HEADERS = frozenset(
    {
        H_ORIGIN_QUEUE,
        H_ORIGIN_GROUP,
        H_ORIGIN_OFFSET,
        H_ATTEMPTS,
        H_FAILURES,
        H_FIRST_FAILURE,
        H_LAST_FAILURE,
        H_LAST_ERROR,
        H_REASON,
        H_DEAD_AT,
        H_REPLAY_GROUP,
        H_QUARANTINED,
    }
)

Delivery = tuple[int, int, float, RecordTuple]
"""(offset, attempt, lease deadline, record); deadline is 0 on at-most-once queues."""

Send = tuple[str | None, str | None, dict[str, str] | None, bytes]
"""(id, key, headers, body) of a message to send."""

ProducerSeq = tuple[str, int, int]
"""(producer id, epoch, sequence) of an idempotent send."""

TxnAcks = list[tuple[int, int, list[tuple[int, int]]]]
"""(member, broker epoch, [(offset, attempt)]) of the deliveries a transaction acks."""

_ticket_lock = threading.Lock()
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}")  # producer and transactional ids


def _check_id(what: str, value: object) -> None:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise UsageError(
            f"{what} is 1-200 characters of letters, digits, '.', '_', ':' and '-', "
            f"starting with a letter or digit; not {value!r}"
        )


def check_size(queue: str, limit: int, headers: dict[str, str] | None, body: bytes) -> None:
    """Raise MessageTooLarge if body and headers exceed ``limit`` bytes."""
    size = len(body)
    if headers:
        size += sum(len(k) + len(v) for k, v in headers.items())
    if size > limit:
        raise MessageTooLarge(queue, size, limit)


class Ticket:
    """Completes when a durable write is committed (or failed). Wait, or add a callback.

    Light to make: the server makes one per request and only adds a callback, so the
    threading.Event that ``wait`` blocks on is created only by a waiter that has to."""

    __slots__ = ("_callbacks", "_done", "_error", "_event", "_on_success", "result")

    def __init__(self) -> None:
        self._done = False
        self._event: threading.Event | None = None
        self._callbacks: list[Callable[[], None]] | None = None
        self._error: BaseException | None = None
        self._on_success: Callable[[], None] | None = None  # runs before waiters wake
        self.result: int = -1

    def __repr__(self) -> str:
        state = "pending" if not self._done else ("failed" if self._error else "done")
        return f"<Ticket {state} result={self.result}>"

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        if error is None and self._on_success is not None:
            self._on_success()
        with _ticket_lock:
            self._done = True
            event = self._event
            callbacks, self._callbacks = self._callbacks, None
        if event is not None:
            event.set()
        for cb in callbacks or ():
            cb()

    def done(self) -> bool:
        return self._done

    def add_done_callback(self, cb: Callable[[], None]) -> None:
        with _ticket_lock:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(cb)
                return
        cb()

    def wait(self, timeout: float | None = None) -> int:
        """Block until committed; return the first offset. Raises the commit's error."""
        if not self._done:
            with _ticket_lock:
                event = self._event
                if event is None and not self._done:
                    event = self._event = threading.Event()
            if event is not None and not event.wait(timeout):
                raise TimeoutError(f"the write was not committed within {timeout} s")
        return self.outcome()

    def outcome(self) -> int:
        if self._error is not None:
            raise self._error
        return self.result

    @classmethod
    def completed(cls, result: int) -> Ticket:
        t = cls()
        t.result = result
        t._done = True
        return t


@dataclass(frozen=True, slots=True)
class DeadMessage:
    """A message in a dead-letter queue, with its provenance."""

    offset: int
    id: str | None
    key: str | None
    body: bytes
    headers: dict[str, str]
    origin_queue: str | None
    origin_group: str | None
    attempts: int
    reason: str | None
    last_error: str | None
    first_failure: float | None
    last_failure: float | None
    replays: int = 0  # times it was replayed before (the arrival-replays header)
    # a replay held it back because it was replayed ``max_replays`` times already (the loop
    # guard): it stays here until replayed with a higher ``max_replays`` or purged
    quarantined: bool = False


def dead_message(
    off: int, mid: str | None, key: str | None, headers: dict[str, str] | None, body: bytes
) -> DeadMessage:
    """The dead letter stored at ``off``, its provenance read from its headers."""
    h = headers or {}

    def num(name: str) -> float | None:
        v = h.get(name)
        return float(v) if v is not None else None

    replays = h.get(H_REPLAYS, "0")  # a producer may have set it: only digits count
    return DeadMessage(
        offset=off,
        id=mid,
        key=key,
        body=body,
        # the target of a quarantined copy (DLQ_GROUP) is bookkeeping, not provenance
        headers={k: v for k, v in h.items() if k != H_REPLAY_GROUP},
        origin_queue=h.get(H_ORIGIN_QUEUE),
        origin_group=h.get(H_ORIGIN_GROUP),
        attempts=int(h.get(H_ATTEMPTS, "0")),
        reason=h.get(H_REASON),
        last_error=h.get(H_LAST_ERROR),
        first_failure=num(H_FIRST_FAILURE),
        last_failure=num(H_LAST_FAILURE),
        replays=int(replays) if replays.isdecimal() else 0,
        quarantined=H_QUARANTINED in h,
    )


class _Batch:
    __slots__ = ("_by_group", "first", "keys", "records", "size", "targets")

    def __init__(self, first: int, records: list[RecordTuple], size: int) -> None:
        self.first = first
        self.records = records
        self.size = size  # bytes stored
        self.keys: list[Key] = [r[2] for r in records]
        targets: dict[int, str] | None = None
        for i, r in enumerate(records):
            h = r[3]
            if h is not None and H_REPLAY_GROUP in h:
                if targets is None:
                    targets = {}
                targets[i] = h[H_REPLAY_GROUP]
        self.targets = targets
        self._by_group: dict[str, list[Key]] | None = None

    def keys_for(self, group: str) -> Sequence[Key]:
        targets = self.targets
        if targets is None:
            return self.keys
        if self._by_group is None:
            self._by_group = {}
        keys = self._by_group.get(group)
        if keys is None:
            keys = [SKIP if targets.get(i, group) != group else k for i, k in enumerate(self.keys)]
            self._by_group[group] = keys
        return keys


class _Group:
    __slots__ = ("lossy", "name", "need_snapshot", "seq", "since_snapshot", "state")

    def __init__(
        self,
        name: str,
        state: GroupState | None,
        lossy: LossyBuffer[tuple[int, RecordTuple]] | None,
    ) -> None:
        self.name = name
        self.state = state
        self.lossy = lossy
        self.seq = 0
        self.since_snapshot = 0
        self.need_snapshot = False


class _Queue:
    __slots__ = (
        "cache",
        "counts",
        "end",
        "firsts",
        "floor_times",
        "groups",
        "ids",
        "lossy",
        "low",
        "name",
        "sent",
        "spec",
        "visible",
    )

    def __init__(self, spec: QueueSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.end = 0  # next offset to assign
        self.visible = 0  # one past the newest committed offset
        self.low = 0  # offsets below were deleted
        # first offset and size of each stored batch, ascending: 16 bytes a batch, so a
        # backlog of millions of one-message batches costs megabytes, not a list of ints
        self.firsts: array[int] = array("q")
        self.counts: array[int] = array("q")
        self.cache: dict[int, _Batch] = {}  # by first offset; the engine bounds it
        self.groups: dict[str, _Group] = {}
        self.sent = 0
        self.floor_times: deque[tuple[int, float]] = deque()  # (min floor, when reached)
        self.lossy: LossyQueue[tuple[int, RecordTuple]] | None = None
        self.ids = IdIndex(spec.dedup_window) if spec.dedup else None
        if spec.guarantee is Guarantee.AT_MOST_ONCE:
            assert spec.capacity is not None
            self.lossy = LossyQueue(spec.capacity, spec.drop, spec.conflate)


_Published = list[tuple["_Queue", int, list[RecordTuple], int, "Ticket | None"]]
_Collected = tuple[WriteSet, _Published, list["Ticket"]]


class _Member:
    __slots__ = ("acked", "closed", "group", "id", "nacked", "queue", "received", "rejected")

    def __init__(self, member_id: int, queue: _Queue, group: _Group) -> None:
        self.id = member_id
        self.queue = queue
        self.group = group
        self.closed = False
        self.received = 0
        self.acked = 0
        self.nacked = 0
        self.rejected = 0


def _lossy_key(item: tuple[int, RecordTuple]) -> object:
    key = item[1][2]
    return item[0] if key is None else key


class Engine:
    """One broker over one store. Thread-safe; see the module docstring for invariants."""

    def __init__(
        self,
        storage: Storage,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        ack_linger_s: float = 0.005,
        producer_horizon_s: float = DEFAULT_DEDUP_WINDOW_S,
    ) -> None:
        if not producer_horizon_s > 0:
            raise UsageError(f"producer_horizon_s must be > 0 seconds, not {producer_horizon_s}")
        self.storage = storage
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.ack_linger_s = ack_linger_s
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)  # consumers wait here for changes
        self._writer_cv = threading.Condition(self._lock)
        self._queues: dict[str, _Queue] = {}
        # decoded batches of every queue, oldest first: (queue, first) -> (queue, batch)
        self._cached: OrderedDict[tuple[str, int], tuple[_Queue, _Batch]] = OrderedDict()
        self.cached = 0  # messages in it
        self.cached_bytes = 0  # their stored size
        self._members: dict[int, _Member] = {}
        self._member_ids = itertools.count(1)
        self._pending: list[tuple[_Queue, int, int, bytes, list[RecordTuple], Ticket | None]] = []
        self._pending_specs: dict[str, bytes | None] = {}
        self._barriers: list[Ticket] = []
        self._dirty: set[tuple[_Queue, _Group]] = set()
        self._watchers: set[Callable[[], None]] = set()
        self.version = 0
        self._failure: BaseException | None = None
        self._closing = False
        self._closed = False
        self._abandon = False
        self._next_dedup_expiry = 0.0
        self._fsync_counts = [0] * (len(FSYNC_BUCKETS_S) + 1)  # the last: above every bound
        self._fsync_sum_s = 0.0
        loaded = storage.load()
        try:
            self.epoch = int(loaded.meta.get("epoch", b"0")) + 1
            self._txns = TransactionTable(self.epoch)
            # canary amo-deliver-first: group -> [(handed out at, member, items)]
            self._unmarked: dict[str, list[tuple[float, int, list[tuple[int, RecordTuple]]]]] = {}
            self._producers = ProducerTable(producer_horizon_s, self.epoch)
            self._restore(loaded.specs, loaded.batches, loaded.groups, loaded.meta)
            self._producers.restore(loaded.producers)
            for name, rows in loaded.ids.items():
                iq = self._queues.get(name)
                if iq is not None and iq.ids is not None:
                    iq.ids.load(rows)
            ws = WriteSet(meta={"epoch": str(self.epoch).encode()})
            synced_s = self._timed_commit(ws)
            if synced_s is not None:
                self._observe_fsync(synced_s)
        except BaseException:
            storage.close()
            raise
        self._writer = threading.Thread(target=self._write_loop, name="arrival-writer", daemon=True)
        self._writer.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("failed" if self._failure else "open")
        return f"<Engine {state} queues={len(self._queues)} epoch={self.epoch} {self.storage!r}>"

    def _timed_commit(self, ws: WriteSet) -> float | None:
        """Commit ``ws``; the seconds it took when it was fsynced, else None."""
        syncs = self.storage.syncs
        started = time.perf_counter()
        self.storage.commit(ws)
        return time.perf_counter() - started if self.storage.syncs != syncs else None

    def _observe_fsync(self, seconds: float) -> None:
        """Count one fsynced commit in the histogram; the caller holds the lock."""
        self._fsync_counts[bisect.bisect_left(FSYNC_BUCKETS_S, seconds)] += 1
        self._fsync_sum_s += seconds

    def fsync_histogram(self) -> Histogram:
        """How long each fsynced commit took (seconds), since the broker opened: one per
        fsync counted in ``info().fsyncs``. Read at no cost to the commits it measures."""
        with self._lock:
            return Histogram(FSYNC_BUCKETS_S, tuple(self._fsync_counts), self._fsync_sum_s)

    # -- recovery ---------------------------------------------------------------------

    def _restore(
        self,
        specs: dict[str, bytes],
        batches: dict[str, list[tuple[int, int]]],
        groups: dict[tuple[str, str], list[tuple[int, bool, bytes]]],
        meta: dict[str, bytes],
    ) -> None:
        for name, data in specs.items():
            q = _Queue(decode_spec(data))
            for first, count in batches.get(name, ()):
                if type(first) is not int or type(count) is not int or count < 1:
                    raise CorruptData(
                        f"the index of queue {name!r} is damaged (a batch at {first!r} of "
                        f"{count!r} messages): the store is damaged; restore it from a backup"
                    )
                q.firsts.append(first)
                q.counts.append(count)
            q.low = int(meta.get(f"low:{name}", b"0"))
            q.end = q.visible = max(q.low, q.firsts[-1] + q.counts[-1] if q.firsts else 0)
            if q.firsts:
                self._batch_at(q, q.end - 1)  # the newest batch fixes the end: check it now
            self._queues[name] = q
        for (qname, gname), records in groups.items():
            gq = self._queues.get(qname)
            if gq is None or gq.lossy is not None:
                continue
            q = gq
            state = self._new_state(q, gname, 0)
            state.restore([r[2] for r in records], records[0][1])
            g = _Group(gname, state, None)
            g.seq = records[-1][0] + 1
            g.since_snapshot = len(records)
            q.groups[gname] = g
            q.end = q.visible = max(q.end, state.floor)

    def _new_state(self, q: _Queue, group: str, start: int) -> GroupState:
        s = q.spec
        return GroupState(
            q.name,
            group,
            start,
            ack_timeout=s.ack_timeout,
            max_deliveries=s.max_deliveries,
            backoff=s.backoff,
            rng=self.rng,
        )

    # -- helpers ----------------------------------------------------------------------

    def _mark_dirty(self, qg: tuple[_Queue, _Group]) -> None:
        """Note a group change for the writer, waking it if it sleeps (invariant 4)."""
        if not self._dirty:
            self._writer_cv.notify()
        self._dirty.add(qg)

    def _check_open(self) -> None:
        if self._failure is not None:
            raise StorageError(
                f"the broker stopped after a storage failure ({self._failure}); nothing "
                f"unconfirmed was acknowledged. Fix the disk and reopen the broker"
            )
        if self._closing:
            raise ClosedError("the broker")

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            raise UnknownQueue(name)
        return q

    def _notify(self) -> None:
        self.version += 1
        self._cv.notify_all()
        for w in self._watchers:
            w()

    def _batch_at(self, q: _Queue, off: int) -> _Batch:
        i = bisect.bisect_right(q.firsts, off) - 1
        if i < 0 or off >= q.firsts[i] + q.counts[i]:
            raise StorageError(f"offset {off} of queue {q.name!r} is not stored")
        first = q.firsts[i]
        b = q.cache.get(first)
        if b is None:
            where = f"batch {first} of queue {q.name!r}"
            data = self.storage.read(q.name, first)
            records = decode_batch(data, where)
            if len(records) != q.counts[i]:
                raise CorruptData(
                    f"{where} holds {len(records)} messages where the index says {q.counts[i]}"
                )
            b = _Batch(first, records, len(data))
            self._cache(q, b)
        return b

    def _cache(self, q: _Queue, b: _Batch) -> None:
        """Keep ``b`` decoded; the oldest cached batches of any queue make room. One
        budget for all queues: a broker's memory does not grow with its queue count."""
        self._uncache(q, b.first)
        q.cache[b.first] = b
        self._cached[(q.name, b.first)] = (q, b)
        self.cached += len(b.records)
        self.cached_bytes += b.size
        lru = self._cached
        while (self.cached > CACHE_MESSAGES or self.cached_bytes > CACHE_BYTES) and len(lru) > 2:
            (_, first), (oq, _old) = next(iter(lru.items()))
            self._uncache(oq, first)

    def _uncache(self, q: _Queue, first: int) -> None:
        gone = q.cache.pop(first, None)
        if gone is not None:
            del self._cached[(q.name, first)]
            self.cached -= len(gone.records)
            self.cached_bytes -= gone.size

    # -- queues -----------------------------------------------------------------------

    def create_queue(self, spec: QueueSpec) -> QueueSpec:
        """Declare ``spec``: create it, or check it matches the stored one (then no-op)."""
        with self._lock:
            self._check_open()
            existing = self._queues.get(spec.name)
            if existing is not None:
                check_compatible(existing.spec, spec)
                return existing.spec
            if spec.dead_letter is not None:
                dl = self._queues.get(spec.dead_letter)
                if dl is None:
                    self._add_queue(dead_letter_spec(spec), dlq=True)
                elif dl.spec.guarantee is Guarantee.AT_MOST_ONCE:
                    raise InvalidQueueSpec(
                        spec.name,
                        f"dead_letter {spec.dead_letter!r} is an at-most-once queue, which "
                        f"may drop what it is given; name a durable queue",
                    )
                elif DLQ_GROUP not in dl.groups:
                    # an existing queue becomes a dead-letter queue from now on
                    self._add_group(dl, DLQ_GROUP, latest=True)
            self._add_queue(spec, dlq=False)
            ticket = self._barrier()
        ticket.wait()
        return spec

    def _add_queue(self, spec: QueueSpec, *, dlq: bool) -> None:
        q = _Queue(spec)
        self._queues[spec.name] = q
        # every spec persists; an at-most-once queue's messages do not
        self._pending_specs[spec.name] = encode_spec(spec)
        if dlq:
            self._add_group(q, DLQ_GROUP, latest=False)

    def spec(self, name: str) -> QueueSpec:
        with self._lock:
            return self._queue(name).spec

    def queue_names(self) -> list[str]:
        with self._lock:
            return sorted(self._queues)

    def describe(self, name: str) -> QueueDescription:
        with self._lock:
            q = self._queue(name)
            facts = dict(self.storage.description) if q.spec.guarantee.durable else {}
            facts["backend"] = "embedded"
            if q.spec.guarantee is Guarantee.EXACTLY_ONCE:
                facts["producer_state"] = (
                    f"kept {self._producers.horizon:g} s after a producer's last send"
                )
            return describe(q.spec, facts)

    def info(self) -> BrokerStats:
        with self._lock:
            return BrokerStats(
                "embedded",
                self.epoch,
                len(self._queues),
                self.storage.commits,
                self.storage.syncs,
            )

    def member_stats(self, member_id: int) -> ConsumerStats:
        with self._lock:
            m = self._members.get(member_id)
            if m is None:
                raise ClosedError("the consumer")
            s = m.group.state
            held = (
                sum(1 for e in s.entries.values() if e.leased and e.consumer == member_id)
                if s is not None
                else 0
            )
            return ConsumerStats(
                m.queue.name, m.group.name, m.id, m.received, m.acked, m.nacked, m.rejected, held
            )

    def _oldest_unacked_age(self, q: _Queue, g: _Group, now: float) -> float:
        """Seconds since the oldest message ``g`` has not settled was stored; 0.0 when
        none. One lookup: a group's floor is its oldest unsettled offset (lossy groups:
        the head of their buffer). The caller holds the lock."""
        s = g.state
        if s is None:
            head = g.lossy.first() if g.lossy is not None else None
            return max(0.0, now - head[1][0]) if head is not None else 0.0
        if s.floor >= q.visible or self._closed:  # a closed store can't be read
            return 0.0
        b = self._batch_at(q, s.floor)
        return max(0.0, now - b.records[s.floor - b.first][0])

    def stats(self, name: str) -> QueueStats:
        with self._lock:
            q = self._queue(name)
            groups = []
            now = self.clock.now()
            members = Counter(m.group.name for m in self._members.values() if m.queue is q)
            for g in q.groups.values():
                s = g.state
                age = self._oldest_unacked_age(q, g, now)
                n = members[g.name]
                if s is None:
                    buf = g.lossy
                    assert buf is not None
                    groups.append(
                        GroupStats(g.name, len(buf), 0, 0, 0, 0, 0, 0, 0, 0, buf.dropped, age, n)
                    )
                    continue
                groups.append(
                    GroupStats(
                        g.name,
                        backlog=s.backlog(q.visible),
                        in_flight=s.in_flight,
                        waiting_retry=len(s.delayed),
                        delivered=s.n_delivered,
                        acked=s.n_acked,
                        redelivered=s.n_redelivered,
                        nacked=s.n_nacked,
                        expired=s.n_expired,
                        dead_lettered=s.n_dead,
                        dropped=0,
                        oldest_unacked_age=age,
                        consumers=n,
                    )
                )
            if q.lossy is not None:
                first, stored = q.visible - len(q.lossy.retained), len(q.lossy.retained)
                dropped = q.lossy.dropped
            else:
                first = q.firsts[0] if q.firsts else q.visible
                first = max(first, q.low)
                stored, dropped = q.visible - first, 0
            return QueueStats(
                q.name, q.spec.guarantee, first, q.visible, stored, q.sent, dropped, tuple(groups)
            )

    def peek(self, name: str, limit: int, start: int | None = None) -> list[StoredMessage]:
        """Up to ``limit`` retained messages from ``start`` (default: the oldest), unconsumed."""
        with self._lock:
            self._check_open()
            q = self._queue(name)
            out: list[StoredMessage] = []
            if q.lossy is not None:
                for off, (ts, mid, key, h, body) in q.lossy.retained.items():
                    if start is None or off >= start:
                        out.append(StoredMessage(off, mid, key, dict(h or {}), body, ts))
                return out[:limit]
            first = max(q.low, q.firsts[0] if q.firsts else q.visible)
            off = first if start is None else max(start, first)
            while off < q.visible and len(out) < limit:
                b = self._batch_at(q, off)
                ts, mid, key, h, body = b.records[off - b.first]
                out.append(StoredMessage(off, mid, key, dict(h or {}), body, ts))
                off += 1
            return out

    # -- producing --------------------------------------------------------------------

    def send(
        self, queue: str, messages: Sequence[Send], producer: ProducerSeq | None = None
    ) -> Ticket | None:
        """Append ``messages`` in order. Durable queues: a Ticket that completes when they
        are committed, with the offset of the first. At-most-once queues: None, and the
        messages are already queued.

        ``producer`` makes the send idempotent: a retry of the same (producer, epoch,
        sequence) gets the original offset and stores nothing. On queues with ``dedup``
        a message whose id is already stored is acknowledged and not stored again.
        """
        return self._send_records(self._queue(queue), self.records(queue, messages), producer)

    def records(self, queue: str, messages: Sequence[Send]) -> list[RecordTuple]:
        """Check ``messages`` against ``queue``'s limits and stamp them for storage."""
        now = self.clock.now()
        limit = self._queue(queue).spec.max_message_bytes  # specs never change once created
        records: list[RecordTuple] = []
        for mid, key, headers, body in messages:
            check_size(queue, limit, headers, body)
            records.append((now, mid, key, headers, body))
        return records

    def send_bodies(
        self, queue: str, bodies: Sequence[bytes], producer: ProducerSeq | None = None
    ) -> Ticket | None:
        """``send`` for messages that are bodies only (no id, key or headers)."""
        now = self.clock.now()
        q = self._queue(queue)
        limit = q.spec.max_message_bytes
        if bodies and max(map(len, bodies)) > limit:
            raise MessageTooLarge(queue, max(map(len, bodies)), limit)
        return self._send_records(q, [(now, None, None, None, b) for b in bodies], producer)

    def is_durable(self, queue: str) -> bool:
        """Whether ``queue`` stores its messages (at-least-once or exactly-once)."""
        return self._queue(queue).lossy is None  # a dict read; specs never change

    def register_producer(self, producer: str) -> int:
        """Open a new incarnation of ``producer``; returns its epoch, fencing earlier ones."""
        _check_id("a producer id", producer)
        with self._lock:
            self._check_open()
            epoch = self._producers.register(producer, self.clock.now())
            ticket = self._barrier()
        ticket.wait()  # the fence is durable before anyone relies on it
        return epoch

    def _send_records(
        self, q: _Queue, records: list[RecordTuple], producer: ProducerSeq | None
    ) -> Ticket | None:
        queue = q.name
        if not records:
            raise UsageError("send needs at least one message")
        # encode outside the lock (concurrent producers encode in parallel with commits),
        # and before any state changes: a message that can't be encoded changes nothing
        data = encode_batch(records) if q.lossy is None else None
        with self._lock:
            self._check_open()
            if self._queues.get(queue) is not q:
                raise UnknownQueue(queue)
            if q.lossy is not None:
                q.sent += len(records)
                self._publish_lossy(q, records)
                return None
            if producer is not None:
                pid, epoch, seq = producer
                dup = self._producers.check(pid, epoch, seq, queue)
                if isinstance(dup, Duplicate):
                    if "dedup-off" not in _canary.ON:
                        return self._ticket_for(q, dup.offset)
                    producer = None  # canary: store the retry again
            ticket = self._append_dedup(q, records, data)
            if producer is not None:
                self._producers.record(pid, epoch, seq, queue, ticket.result, self.clock.now())
                if ticket.done():
                    # every message was a duplicate, so nothing new is stored; the
                    # sequence is, and must be durable before the send is acknowledged
                    barrier = self._barrier()
                    barrier.result = ticket.result
                    ticket = barrier
            return ticket

    def _publish_lossy(self, q: _Queue, records: list[RecordTuple]) -> None:
        assert q.lossy is not None
        off = q.visible
        items = list(zip(range(off, off + len(records)), records, strict=True))
        keys = [_lossy_key(item) for item in items] if q.lossy.conflate else []
        q.lossy.put_many(items, keys)
        q.end = q.visible = off + len(records)
        self._notify()

    def _ticket_for(self, q: _Queue, offset: int) -> Ticket:
        """A Ticket for a message queued earlier: done once it is committed."""
        if offset < q.visible:
            return Ticket.completed(offset)
        ticket = self._barrier()  # commits are in order: the next one includes it
        ticket.result = offset
        return ticket

    def _append_dedup(
        self, q: _Queue, records: list[RecordTuple], data: bytes | None = None
    ) -> Ticket:
        """``_append``, leaving out messages whose id ``q`` already stores (with ``dedup``).

        The Ticket's result is the offset of the first message: for a duplicate, the
        offset at which the original was stored. The caller holds the lock.
        """
        ids = q.ids
        if ids is None or "dedup-off" in _canary.ON:
            q.sent += len(records)
            return self._append(q, records, data)
        fresh: list[RecordTuple] = []
        first_dup: int | None = None
        off = q.end
        now = self.clock.now()
        for r in records:
            mid = r[1]
            if mid is not None:
                known = ids.get(mid)
                if known is not None:
                    if first_dup is None and not fresh:
                        first_dup = known
                    continue
                ids.add(mid, off, now)
            fresh.append(r)
            off += 1
        if not fresh:
            assert first_dup is not None
            return self._ticket_for(q, first_dup)
        q.sent += len(fresh)
        ticket = self._append(q, fresh, data if len(fresh) == len(records) else None)
        if first_dup is not None:
            ticket.result = first_dup
        return ticket

    def _append(self, q: _Queue, records: list[RecordTuple], data: bytes | None = None) -> Ticket:
        """Queue a durable batch for the writer; the caller holds the lock."""
        ticket = Ticket()
        first = ticket.result = q.end
        q.end += len(records)
        if data is None:
            data = encode_batch(records)
        self._pending.append((q, first, len(records), data, records, ticket))
        self._writer_cv.notify()
        return ticket

    # -- consuming --------------------------------------------------------------------

    def join(self, queue: str, group: str, *, latest: bool = False) -> int:
        """Register a consumer in ``group`` (created on first use); returns its member id."""
        validate_queue_name(group)
        with self._lock:
            self._check_open()
            q = self._queue(queue)
            g = q.groups.get(group) or self._add_group(q, group, latest=latest)
            member = _Member(next(self._member_ids), q, g)
            self._members[member.id] = member
            return member.id

    def _add_group(self, q: _Queue, name: str, *, latest: bool) -> _Group:
        if q.lossy is not None:
            buf = q.lossy.add_group(name, latest, _lossy_key)
            g = _Group(name, None, buf)
        else:
            start = q.visible if latest else max(q.low, q.firsts[0] if q.firsts else q.visible)
            g = _Group(name, self._new_state(q, name, start), None)
            g.need_snapshot = True
            self._mark_dirty((q, g))
        q.groups[name] = g
        return g

    def leave(self, member_id: int) -> None:
        """The consumer is gone: release its leases without spending attempts."""
        with self._lock:
            m = self._members.pop(member_id, None)
            if m is None or m.closed:
                return
            m.closed = True
            s = m.group.state
            if s is not None and s.release_consumer(member_id):
                self._mark_dirty((m.queue, m.group))
            self._notify()  # wakes this member's own blocked receive, and others

    def poll(self, member_id: int, limit: int) -> tuple[list[Delivery], int, float | None]:
        """Take up to ``limit`` deliveries without waiting.

        Returns (deliveries, version, next_due): wait for ``version`` to change, or until
        ``next_due`` (engine clock) when a retry or lease expiry falls due, then poll again.
        """
        with self._lock:
            self._check_open()
            m = self._members.get(member_id)
            if m is None:
                raise ClosedError("the consumer")
            q, g = m.queue, m.group
            if g.lossy is not None:
                items = g.lossy.take(limit)
                if "amo-deliver-first" in _canary.ON:
                    items = self._canary_unmarked(g, member_id, items)
                m.received += len(items)
                return [(off, 1, 0.0, rec) for off, rec in items], self.version, None
            s = g.state
            assert s is not None
            now = self.clock.now()
            self._expire(q, g, now)
            group = g.name
            visible = q.visible

            def keys_at(off: int) -> tuple[int, Sequence[Key]] | None:
                if off >= visible:
                    return None
                b = self._batch_at(q, off)  # batches become visible whole
                return b.first, b.keys_for(group)

            grants = s.grant(now, limit, member_id, keys_at)
            out: list[Delivery] = []
            m.received += len(grants)
            if grants:
                self._mark_dirty((q, g))
                append = out.append
                first = end = 0
                records: list[RecordTuple] = []
                for off, attempt, deadline in grants:
                    if not first <= off < end:
                        b = self._batch_at(q, off)
                        first, records = b.first, b.records
                        end = first + len(records)
                    append((off, attempt, deadline, records[off - first]))
            return out, self.version, s.next_due()

    def _canary_unmarked(
        self, g: _Group, member_id: int, items: list[tuple[int, RecordTuple]]
    ) -> list[tuple[int, RecordTuple]]:
        """Canary: messages are marked delivered only ``CANARY_GAP_S`` after they were
        handed out; until then every other consumer of the group gets them too."""
        t = time.monotonic()
        recent = [u for u in self._unmarked.get(g.name, []) if t - u[0] < CANARY_GAP_S]
        again = [it for _t, mid, its in recent if mid != member_id for it in its]
        keep = [u for u in recent if u[1] == member_id]  # each goes out twice at most
        self._unmarked[g.name] = [*keep, (t, member_id, items)]
        return again + items

    def _expire(self, q: _Queue, g: _Group, now: float) -> None:
        s = g.state
        if s is None:
            return
        due = s.next_due()
        if due is None or due > now:
            return
        actions = s.expire(now)
        self._mark_dirty((q, g))
        for a in actions:
            self._dead_letter(q, g, a, now)
        self._notify()

    def wait(self, version: int, timeout: float | None) -> None:
        """Block until the engine changes after ``version``, or ``timeout`` seconds."""
        with self._lock:
            if self.version == version and not self._closing:
                self._cv.wait(timeout)

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) on every change; returns the unwatch function."""
        with self._lock:
            self._watchers.add(callback)

        def unwatch() -> None:
            with self._lock:
                self._watchers.discard(callback)

        return unwatch

    # -- settling ---------------------------------------------------------------------

    def _settle_target(
        self, member_id: int, epoch: int, off: int, attempt: int
    ) -> tuple[_Queue, _Group, GroupState]:
        self._check_open()
        m = self._members.get(member_id)
        if m is None or epoch != self.epoch:
            raise LeaseExpired(
                "?" if m is None else m.queue.name,
                off,
                attempt,
                "the consumer was closed or the broker restarted since this delivery",
            )
        s = m.group.state
        if s is None:
            raise NotSupported(
                f"queue {m.queue.name!r} is at-most-once: a message counts as processed "
                f"when it is handed out, so it cannot be nacked, rejected or extended"
            )
        self._expire(m.queue, m.group, self.clock.now())
        self._mark_dirty((m.queue, m.group))
        return m.queue, m.group, s

    def ack(self, member_id: int, epoch: int, receipts: Iterable[tuple[int, int]]) -> Ticket | None:
        """Settle deliveries, each named by (offset, attempt). Stops at the first stale one.

        On exactly-once queues, returns a Ticket that completes once the acks are durable
        (a confirmed commit); elsewhere None: the acks are committed within the linger.
        """
        with self._lock:
            m = self._members.get(member_id)
            if m is not None and m.group.state is None:
                return None  # at-most-once: handed out is processed
            receipts = list(receipts)
            if not receipts:
                return None
            q, _g, s = self._settle_target(member_id, epoch, *receipts[0])
            before = s.n_acked
            try:
                s.ack_many(receipts)
            finally:
                self._members[member_id].acked += s.n_acked - before
                if s.ready:
                    self._notify()
            if q.spec.guarantee is Guarantee.EXACTLY_ONCE:
                return self._barrier()
            return None

    # -- transactions -----------------------------------------------------------------

    def begin_transaction(self, tid: str) -> tuple[int, int]:
        """Open transactional id ``tid``; the returned epoch fences every earlier holder."""
        _check_id("a transactional id", tid)
        with self._lock:
            self._check_open()
            return self._txns.begin(tid)

    def end_transaction(self, tid: str, epoch: tuple[int, int]) -> None:
        """The holder aborted: forget ``tid`` unless a newer holder has it."""
        with self._lock:
            self._txns.end(tid, epoch)

    def commit_transaction(
        self,
        tid: str,
        epoch: tuple[int, int],
        started: float,
        timeout: float,
        sends: Sequence[tuple[str, list[RecordTuple]]],
        acks: TxnAcks,
        *,
        keep: bool = False,
    ) -> Ticket:
        """Apply a transaction's sends and acks in one atomic commit, or none of them.

        Refused (nothing applied) if ``tid`` was fenced, the transaction outlived
        ``timeout``, a queue is unknown, or any ack's lease is no longer current.
        The Ticket completes once the commit is durable; messages sent to at-most-once
        queues are handed out only then. ``keep``: the holder keeps its epoch for further
        transactions (a processing loop); otherwise the id is forgotten after this one.
        """
        # encode every durable batch before anything changes: all or nothing
        encoded = [
            (
                self._queue(name),
                records,
                None if not self.is_durable(name) else encode_batch(records),
            )
            for name, records in sends
        ]
        with self._lock:
            self._check_open()
            now = self.clock.now()
            try:
                self._txns.check(tid, epoch, started, timeout, now)
                by_member: dict[tuple[int, int], dict[tuple[int, int], None]] = {}
                for member_id, m_epoch, receipts in acks:
                    by_member.setdefault((member_id, m_epoch), {}).update(dict.fromkeys(receipts))
                targets = []
                for (member_id, m_epoch), unique in by_member.items():
                    m = self._members.get(member_id)
                    if not unique or (m is not None and m.group.state is None):
                        continue  # at-most-once: handed out is processed
                    receipts = list(unique)
                    _q, _g, st = self._settle_target(member_id, m_epoch, *receipts[0])
                    for off, attempt in receipts:
                        st.check(off, attempt)
                    targets.append((member_id, st, receipts))
            except BaseException:
                if not keep:
                    self._txns.end(tid, epoch)
                raise
            lossy: list[tuple[_Queue, list[RecordTuple]]] = []
            late: list[tuple[_Queue, list[RecordTuple], bytes | None]] = []
            for q, records, data in encoded:
                if q.lossy is not None:
                    lossy.append((q, records))
                elif "acks-before-outputs" in _canary.ON:
                    late.append((q, records, data))
                else:
                    self._append_dedup(q, records, data)
            if late:
                threading.Timer(CANARY_GAP_S, self._canary_late_outputs, (late,)).start()
            for member_id, st, receipts in targets:
                st.ack_many(receipts)
                self._members[member_id].acked += len(receipts)
            if not keep:
                self._txns.end(tid, epoch)
            ticket = self._barrier()
            if lossy:
                # handed out once durable, and before commit() returns: set under the
                # lock, before the writer can take the barrier
                def publish() -> None:
                    with self._lock:
                        for q, records in lossy:
                            q.sent += len(records)
                            self._publish_lossy(q, records)

                ticket._on_success = publish
            if targets:
                self._notify()
        return ticket

    def _canary_late_outputs(
        self, late: list[tuple[_Queue, list[RecordTuple], bytes | None]]
    ) -> None:
        with self._lock:
            if self._failure is None and not self._closing:
                for q, records, data in late:
                    self._append_dedup(q, records, data)

    def nack(
        self,
        member_id: int,
        epoch: int,
        off: int,
        attempt: int,
        delay_s: float | None,
        error: str | None,
    ) -> bool:
        """A failed attempt; returns True if the message was dead-lettered."""
        with self._lock:
            q, g, s = self._settle_target(member_id, epoch, off, attempt)
            now = self.clock.now()
            action = s.nack(off, attempt, now, delay_s, error)
            self._members[member_id].nacked += 1
            if action is not None:
                self._dead_letter(q, g, action, now)
            self._notify()
            return action is not None

    def reject(self, member_id: int, epoch: int, off: int, attempt: int, reason: str) -> None:
        with self._lock:
            q, g, s = self._settle_target(member_id, epoch, off, attempt)
            if q.spec.dead_letter is None:
                raise NotSupported(
                    f"queue {q.name!r} has no dead-letter queue, so a message cannot be "
                    f"rejected; nack it to retry, or ack it to drop it deliberately"
                )
            now = self.clock.now()
            self._dead_letter(q, g, s.reject(off, attempt, now, reason), now)
            self._members[member_id].rejected += 1
            self._notify()

    def extend(
        self, member_id: int, epoch: int, off: int, attempt: int, seconds: float | None
    ) -> float:
        with self._lock:
            _q, _g, s = self._settle_target(member_id, epoch, off, attempt)
            return s.extend(off, attempt, self.clock.now(), seconds)

    def release(self, member_id: int, epoch: int, off: int, attempt: int) -> None:
        with self._lock:
            _q, _g, s = self._settle_target(member_id, epoch, off, attempt)
            s.release(off, attempt)
            self._notify()

    def is_leased(self, member_id: int, epoch: int, off: int, attempt: int) -> bool:
        with self._lock:
            m = self._members.get(member_id)
            if m is None or epoch != self.epoch or self._failure is not None:
                return False
            s = m.group.state
            return s is None or s.is_leased(off, attempt, self.clock.now())

    def _dead_letter(self, q: _Queue, g: _Group, a: DeadLetterAction, now: float) -> None:
        """Append the message to the dead-letter queue; the settle is already in ``g``."""
        dlq = self._queues[q.spec.dead_letter] if q.spec.dead_letter else None
        if dlq is None:  # resolve_spec guarantees a DLQ whenever the budget can run out
            raise StorageError(f"queue {q.name!r} lost its dead-letter queue")
        b = self._batch_at(q, a.offset)
        _ts, mid, key, headers, body = b.records[a.offset - b.first]
        if mid is None:
            mid = f"{q.name}:{a.offset}"  # keep the message traceable after it moves
        h = dict(headers) if headers else {}
        h.pop(H_REPLAY_GROUP, None)
        h.update(
            {
                H_ORIGIN_QUEUE: q.name,
                H_ORIGIN_GROUP: g.name,
                H_ORIGIN_OFFSET: str(a.offset),
                H_ATTEMPTS: str(a.attempts),
                H_FAILURES: str(a.failures),
                H_REASON: a.reason,
                H_DEAD_AT: repr(now),
            }
        )
        if a.first_failure is not None:
            h[H_FIRST_FAILURE] = repr(a.first_failure)
        if a.last_failure is not None:
            h[H_LAST_FAILURE] = repr(a.last_failure)
        if a.last_error is not None:
            h[H_LAST_ERROR] = a.last_error[:2000]
        self._append(dlq, [(now, mid, key, h, body)])

    # -- dead letters -----------------------------------------------------------------

    def _dlq(self, queue: str) -> tuple[_Queue, _Group, GroupState]:
        q = self._queue(queue)
        name = q.spec.dead_letter
        dlq = self._queues.get(name) if name else None
        if dlq is None or DLQ_GROUP not in dlq.groups:
            raise NotSupported(f"queue {queue!r} has no dead-letter queue")
        g = dlq.groups[DLQ_GROUP]
        assert g.state is not None
        return dlq, g, g.state

    def dead_letters(self, queue: str, limit: int | None = None) -> list[DeadMessage]:
        """The messages in ``queue``'s dead-letter queue, oldest first."""
        with self._lock:
            self._check_open()
            dlq, _g, s = self._dlq(queue)
            return self._select_dead(dlq, s, None, limit)

    def _select_dead(
        self,
        dlq: _Queue,
        s: GroupState,
        where: Callable[[DeadMessage], bool] | None,
        limit: int | None,
        max_replays: int | None = None,
        held: list[DeadMessage] | None = None,
    ) -> list[DeadMessage]:
        """The dead letters still in ``dlq`` that ``where`` selects, oldest first, at most
        ``limit``. With ``max_replays`` (the loop guard), a selected letter replayed that
        often already goes to ``held`` instead, and does not count toward ``limit``."""
        out: list[DeadMessage] = []
        for off in range(s.floor, dlq.visible):
            if limit is not None and len(out) >= limit:
                break
            if off in s.settled:
                continue
            d = self._dead_message(dlq, off)
            if where is not None and not where(d):
                continue
            if max_replays is not None and d.replays >= max_replays:
                if held is not None:
                    held.append(d)
                continue
            out.append(d)
        return out

    def _dead_message(self, dlq: _Queue, off: int) -> DeadMessage:
        b = self._batch_at(dlq, off)
        _ts, mid, key, headers, body = b.records[off - b.first]
        return dead_message(off, mid, key, headers, body)

    def replay_dead_letters(
        self,
        queue: str,
        where: Callable[[DeadMessage], bool] | None = None,
        *,
        limit: int | None = None,
        dry_run: bool = False,
        max_replays: int | None = None,
    ) -> tuple[list[DeadMessage], list[DeadMessage], Ticket | None]:
        """Send dead letters back to the group that failed them, and remove them from the DLQ.

        The replayed copy goes only to its origin group (other groups already have it),
        with a fresh failure budget and its ``arrival-replays`` header one higher. Both
        happen in one commit.

        The loop guard: with ``max_replays``, a selected letter already replayed that many
        times is not replayed but quarantined: it stays in the DLQ, marked with the
        ``arrival-quarantined`` header, in the same commit. Marking re-files the letter at
        the end of the DLQ (stored records are never rewritten): it keeps its id and
        provenance and gets a new offset; the copy goes to the DLQ's listing only, not to
        other groups consuming the DLQ. Returns (replayed, held back by the guard, the
        commit's ticket or None); ``dry_run`` returns both lists and changes nothing.
        """
        with self._lock:
            self._check_open()
            dlq, g, s = self._dlq(queue)
            origin = self._queue(queue)
            held: list[DeadMessage] = []
            chosen = self._select_dead(dlq, s, where, limit, max_replays, held)
            fresh = [d for d in held if not d.quarantined]  # marked by this call
            if dry_run or not (chosen or fresh):
                return chosen, held, None
            now = self.clock.now()
            ticket: Ticket | None = None
            if chosen:
                records: list[RecordTuple] = []
                for d in chosen:
                    # the message's own headers (a router's arrival-type, a traceparent)
                    # go back with it; its dead-letter provenance does not
                    h = {k: v for k, v in d.headers.items() if k not in _DEAD_LETTER_HEADERS}
                    h[H_REPLAYS] = str(d.replays + 1)
                    if d.origin_group:
                        h[H_REPLAY_GROUP] = d.origin_group
                    records.append((now, d.id, d.key, h, d.body))
                    s.settle_unleased(d.offset)
                ticket = self._append(origin, records)
                if origin.ids is not None:  # the copy is retained: its id keeps deduplicating
                    for off, r in enumerate(records, ticket.result):
                        if r[1] is not None:
                            origin.ids.add(r[1], off, now)
            if fresh:
                marked: list[RecordTuple] = []
                for d in fresh:
                    h = {**d.headers, H_QUARANTINED: repr(now), H_REPLAY_GROUP: DLQ_GROUP}
                    marked.append((now, d.id, d.key, h, d.body))
                    s.settle_unleased(d.offset)
                first = dlq.end
                ticket = self._append(dlq, marked)  # after the origin's: one commit, in order
                quarantined = {d.offset: i for i, d in enumerate(fresh)}
                held = [
                    self._held(d, first + quarantined[d.offset], now)
                    if d.offset in quarantined
                    else d
                    for d in held
                ]
            self._mark_dirty((dlq, g))
            return chosen, held, ticket

    @staticmethod
    def _held(d: DeadMessage, offset: int, now: float) -> DeadMessage:
        """``d`` as quarantined at ``offset`` (where its marked copy is appended)."""
        return replace(
            d, offset=offset, quarantined=True, headers={**d.headers, H_QUARANTINED: repr(now)}
        )

    def purge_dead_letters(
        self, queue: str, where: Callable[[DeadMessage], bool] | None = None
    ) -> int:
        """Delete dead letters (all, or those ``where`` selects); returns how many."""
        with self._lock:
            self._check_open()
            dlq, g, s = self._dlq(queue)
            chosen = self._select_dead(dlq, s, where, None)
            for d in chosen:
                s.settle_unleased(d.offset)
            n = len(chosen)
            if n:
                self._mark_dirty((dlq, g))
                ticket = self._barrier()
        if n:
            ticket.wait()
        return n

    def flush(self) -> Ticket:
        """A Ticket that completes once everything done so far is committed (synced)."""
        with self._lock:
            self._check_open()
            return self._barrier()

    def _barrier(self) -> Ticket:
        """A Ticket for the next commit, which will be synced; the caller holds the lock."""
        ticket = Ticket()
        self._barriers.append(ticket)
        self._writer_cv.notify()
        return ticket

    # -- the writer -------------------------------------------------------------------

    def _collect(self) -> _Collected:
        """Take everything there is to commit; the caller holds the lock."""
        ws = WriteSet(sync=False)
        published = []
        for q, first, n, data, records, ticket in self._pending:
            ws.batches.append((q.name, first, n, data))
            published.append((q, first, records, len(data), ticket))
        self._pending = []
        if self._pending_specs:
            ws.specs, self._pending_specs = self._pending_specs, {}
        tickets, self._barriers = self._barriers, []
        ws.sync = bool(ws.batches or ws.specs or tickets)
        for q, g in self._dirty:
            s = g.state
            if s is None:
                continue
            if g.need_snapshot or g.since_snapshot >= SNAPSHOT_EVERY:
                s.drain()
                ws.groups.append(GroupRecord(q.name, g.name, g.seq, True, s.snapshot()))
                g.need_snapshot = False
                g.since_snapshot = 1
                g.seq += 1
            else:
                delta = s.drain()
                if delta is not None:
                    ws.groups.append(GroupRecord(q.name, g.name, g.seq, False, delta))
                    g.since_snapshot += 1
                    g.seq += 1
        self._dirty.clear()
        self._collect_dedup(ws)
        for q, below in self._trims():
            ws.trims[q.name] = below
            ws.meta[f"low:{q.name}"] = str(below).encode()
            # forget the batches now, before the commit deletes them, so that no reader
            # (a new group, peek, a dead-letter listing) looks for them meanwhile
            q.low = below
            n = bisect.bisect_left(q.firsts, below)
            for first in q.firsts[:n]:
                self._uncache(q, first)
            del q.firsts[:n], q.counts[:n]
        return ws, published, tickets

    def _collect_dedup(self, ws: WriteSet) -> None:
        """Producer states and message ids to store with this commit's batches."""
        now = self.clock.now()
        if now >= self._next_dedup_expiry:
            self._next_dedup_expiry = now + DEDUP_EXPIRY_S
            self._producers.expire(now)
            for q in self._queues.values():
                if q.ids is not None:
                    trim = q.ids.expire(now, q.low)
                    if trim is not None:
                        ws.id_trims[q.name] = trim
        if self._producers.dirty:
            ws.producers = self._producers.drain()
        for q in self._queues.values():
            if q.ids is not None and q.ids.added:
                row = q.ids.drain()
                if row is not None:
                    ws.ids.append((q.name, *row))

    def _trims(self) -> list[tuple[_Queue, int]]:
        now = self.clock.now()
        out = []
        for q in self._queues.values():
            if not q.groups or q.lossy is not None or len(q.firsts) < 2:
                continue
            floor = min(g.state.floor for g in q.groups.values() if g.state is not None)
            last = q.floor_times[-1] if q.floor_times else None
            if last is None or (last[0] < floor and now - last[1] >= FLOOR_TICK_S):
                q.floor_times.append((floor, now))
            below = q.low
            horizon = now - q.spec.retention
            while q.floor_times and q.floor_times[0][1] <= horizon:
                below = max(below, q.floor_times.popleft()[0])
            below = min(below, q.firsts[-1])  # keep the newest batch: it records the end
            i = bisect.bisect_right(q.firsts, below) - 1  # batches wholly below `below`
            while i >= 0 and q.firsts[i] + q.counts[i] > below:
                i -= 1
            if i >= 0:
                out.append((q, q.firsts[i] + q.counts[i]))
        return out

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                if not (self._pending or self._barriers or self._closing):
                    self._writer_cv.wait(self.ack_linger_s if self._dirty else HOUSEKEEPING_S)
                    if not (self._pending or self._barriers or self._closing):
                        now = self.clock.now()
                        for q in self._queues.values():
                            for g in list(q.groups.values()):
                                self._expire(q, g, now)
                if self._abandon:
                    return
                closing = self._closing
                ws, published, tickets = self._collect()
                if closing:
                    ws.sync = True
            error: BaseException | None = None
            synced_s: float | None = None
            if ws:
                try:
                    _crash.hit("writer.before-commit")
                    synced_s = self._timed_commit(ws)
                    _crash.hit("writer.after-commit")
                except BaseException as exc:  # noqa: BLE001 - every failure stops the engine
                    error = exc if isinstance(exc, ArrivalError) else StorageError(str(exc))
            with self._lock:
                if synced_s is not None:
                    self._observe_fsync(synced_s)
                if error is not None:
                    self._failure = error
                    failed = list(self._pending)
                    self._pending = []
                    # barriers taken while this commit ran wait for a commit that won't come
                    tickets.extend(self._barriers)
                    self._barriers = []
                else:
                    failed = []
                    for q, first, records, size, _t in published:
                        q.visible = first + len(records)
                        q.firsts.append(first)
                        q.counts.append(len(records))
                        self._cache(q, _Batch(first, records, size))
                if published or error is not None:
                    self._notify()
            for _q, _first, _records, _size, ticket in published:
                if ticket is not None:
                    ticket._finish(error)
            for ticket in tickets:
                ticket._finish(error)
            for *_, ticket in failed:
                if ticket is not None:
                    ticket._finish(error)
            if published:
                _crash.hit("writer.after-ack")
            if error is not None or closing:
                return

    # -- closing ----------------------------------------------------------------------

    def close(self) -> None:
        """Release every lease (no attempt spent), commit what is pending, close the store."""
        with self._lock:
            if self._closed:
                return
            self._closing = True
            for m in list(self._members.values()):
                s = m.group.state
                if s is not None:
                    s.release_consumer(m.id)
                m.closed = True
            self._members.clear()
            self._writer_cv.notify()
            self._notify()
        self._writer.join()
        with self._lock:
            self._closed = True
        self.storage.close()

    def abandon(self) -> None:
        """Stop as a crash would: nothing pending is committed. For tests."""
        with self._lock:
            if self._closed:
                return
            self._abandon = self._closing = True
            self._writer_cv.notify()
            self._notify()
        self._writer.join()
        with self._lock:
            self._closed = True
            failed, self._pending = self._pending, []
            barriers, self._barriers = self._barriers, []
        error = StorageError("the broker crashed before this write was committed")
        for *_, ticket in failed:
            if ticket is not None:
                ticket._finish(error)
        for ticket in barriers:
            ticket._finish(error)
        self.storage.close()

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def failure(self) -> BaseException | None:
        """The storage failure that stopped the engine, if one did."""
        return self._failure
