"""The at-least-once delivery state of one consumer group on one queue: a pure state machine.

The log is a sequence of offsets. This module decides which offsets a group's consumers
get, holds their leases, retries failures with backoff, and settles them (ack, reject,
dead-letter). It does no I/O: the caller passes ``now`` (seconds), the keys of the log
(``KeysAt``) and a ``random.Random``; it drains the changes to persist as bytes
(``drain``) and rebuilds itself from them after a restart (``restore``).

Invariants:
1. Every offset below ``floor`` is settled; ``settled`` holds the settled offsets at or
   above it, so ``floor`` never passes an unsettled offset.
2. An offset at or past ``cursor`` has never been looked at; below it, an unsettled offset
   is in exactly one place: leased (in flight), ``ready``, ``delayed`` (waiting for its
   backoff) or blocked behind an earlier offset of its key.
3. Per key, at most one offset is leased, ready or delayed: the head of ``keys[key]``.
   Later offsets of that key wait until the head is settled, so a key's messages are
   delivered in log order and never two at once.
4. A receipt names its offset and attempt; only the current lease's attempt is honoured.
   Attempt numbers grow by one per delivery and survive a restart.
5. Releases (shutdown, disconnect) never spend the failure budget; nacks and lease expiry do.
6. At most ``max_tracked`` offsets are tracked (leased, waiting or blocked): memory stays
   bounded however far a stuck key holds the floor back.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from arrival._canary import ON as _CANARIES
from arrival.errors import AlreadySettled, LeaseExpired, StorageError
from arrival.model import Backoff
from arrival.semantics.retry import DeadLetter, decide_retry

__all__ = ["SKIP", "DeadLetterAction", "Grant", "GroupState", "KeysAt"]


class _Skip:
    def __repr__(self) -> str:
        return "SKIP"


SKIP: Final = _Skip()
"""Key of a log entry addressed to another group (a replay): settled unseen by this group."""

Key = str | None | _Skip
KeysAt = Callable[[int], tuple[int, Sequence[Key]] | None]
"""``keys_at(offset)`` -> ``(base, keys)`` where ``keys[i]`` is the key of offset ``base+i``
and ``base <= offset < base+len(keys)``; None when ``offset`` is not yet readable."""

MAX_TRACKED = 1_000_000
"""Unsettled messages a group tracks at most (~200 MB). Messages blocked behind a stuck key
count too: past this the group stops reading ahead until something settles, so a hot key
that fails for hours cannot make the broker hold the whole backlog in memory."""

Grant = tuple[int, int, float]
"""A delivery: (offset, attempt, lease deadline)."""


@dataclass(frozen=True, slots=True)
class DeadLetterAction:
    """The caller must move ``offset`` to the dead-letter queue, atomically with the settle."""

    offset: int
    reason: str
    attempts: int
    failures: int
    first_failure: float | None
    last_failure: float | None
    last_error: str | None


class _Entry:
    """An offset the group has seen and not settled."""

    __slots__ = (
        "consumer",
        "deadline",
        "deliveries",
        "failures",
        "first_fail",
        "key",
        "last_error",
        "last_fail",
        "leased",
        "not_before",
    )

    def __init__(self, key: str | None) -> None:
        self.key = key
        self.deliveries = 0
        self.failures = 0
        self.first_fail: float | None = None
        self.last_fail: float | None = None
        self.last_error: str | None = None
        self.not_before = 0.0
        self.leased = False
        self.deadline = 0.0
        self.consumer = 0


class _Snapshot(msgspec.Struct, array_like=True):
    floor: int
    settled: list[tuple[int, int]]
    entries: list[tuple[int, int, int, float | None, float | None, str | None, float]]


class _Delta(msgspec.Struct, array_like=True):
    delivered: list[tuple[int, int]]
    settled: list[tuple[int, int]]
    failed: list[tuple[int, int, float | None, float | None, str | None, float]]


_snap_enc = msgspec.msgpack.Encoder()
_snap_dec = msgspec.msgpack.Decoder(_Snapshot)
_delta_dec = msgspec.msgpack.Decoder(_Delta)


def _ranges(offsets: list[int]) -> list[tuple[int, int]]:
    """Run-length encode offsets as (start, length), keeping duplicates and order of runs."""
    out: list[tuple[int, int]] = []
    if not offsets:
        return out
    start = prev = offsets[0]
    for off in offsets[1:]:
        if off == prev + 1:
            prev = off
            continue
        out.append((start, prev - start + 1))
        start = prev = off
    out.append((start, prev - start + 1))
    return out


class GroupState:
    """Delivery state of one group; see the module docstring for its invariants."""

    def __init__(
        self,
        queue: str,
        group: str,
        start: int,
        *,
        ack_timeout: float,
        max_deliveries: int | None,
        backoff: Backoff,
        rng: random.Random,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.queue = queue
        self.group = group
        self.ack_timeout = ack_timeout
        self.max_deliveries = max_deliveries
        self.backoff = backoff
        self.rng = rng
        self.max_tracked = max_tracked
        self.floor = start
        self.cursor = start
        self.settled: set[int] = set()
        self.entries: dict[int, _Entry] = {}
        self.keys: dict[str, deque[int]] = {}
        self.ready: deque[int] = deque()
        self.delayed: list[tuple[float, int]] = []
        # lease deadlines: grants come in time order with one ack_timeout, so a deque of
        # (deadline, offsets) stays sorted; extend() goes to a heap.
        self._expiries: deque[tuple[float, list[tuple[int, int]]]] = deque()
        self._extended: list[tuple[float, int]] = []
        self.in_flight = 0
        # recovered history, consumed as the cursor passes it again
        self._restored: dict[int, _Entry] = {}
        self._restore_end = start
        # changes not yet drained for persistence
        self._ev_delivered: list[int] = []
        self._ev_settled: list[int] = []
        self._ev_failed: dict[int, _Entry] = {}
        # counters since open
        self.n_delivered = 0
        self.n_acked = 0
        self.n_nacked = 0
        self.n_expired = 0
        self.n_redelivered = 0
        self.n_dead = 0

    def __repr__(self) -> str:
        return (
            f"<GroupState {self.queue}/{self.group} floor={self.floor} cursor={self.cursor} "
            f"in_flight={self.in_flight} ready={len(self.ready)} delayed={len(self.delayed)}>"
        )

    # -- delivery -------------------------------------------------------------------

    def grant(self, now: float, limit: int, consumer: int, keys_at: KeysAt) -> list[Grant]:
        """Lease up to ``limit`` messages to ``consumer``: due retries first, then new ones."""
        out: list[Grant] = []
        if limit <= 0:
            return out
        deadline = now + self.ack_timeout
        delayed = self.delayed
        while delayed and delayed[0][0] <= now:
            self.ready.append(heapq.heappop(delayed)[1])
        entries = self.entries
        ready = self.ready
        while ready and len(out) < limit:
            off = ready.popleft()
            e = entries.get(off)
            if e is None or e.leased:
                continue  # settled (settle_unleased) or already leased since
            out.append(self._lease(off, e, deadline, consumer))
            self.n_redelivered += e.deliveries > 1
        keys = self.keys
        fresh = 0
        if self.cursor < self.floor:
            # after a restart, acks can move the floor past the cursor: everything in
            # between is settled, and its batches may already be deleted
            self.cursor = self.floor
        ev_delivered = self._ev_delivered.append
        stalled = False
        while len(out) < limit:
            chunk = keys_at(self.cursor)
            if chunk is None:
                break
            base, batch_keys = chunk
            i = self.cursor - base
            n = len(batch_keys)
            while i < n and len(out) < limit:
                off = base + i
                key = batch_keys[i]
                i += 1
                if off < self._restore_end:
                    # settled before the restart: below the floor (which may have moved
                    # past the cursor since) or in the settled set
                    if off < self.floor or off in self.settled:
                        continue
                    e_or_none = self._restored.pop(off, None)
                    if e_or_none is not None:
                        self._admit_restored(off, e_or_none, key, now, deadline, consumer, out)
                        continue
                if key is SKIP:
                    self._settle(off, None)
                    continue
                if len(entries) >= self.max_tracked:
                    i -= 1  # memory bound reached: stop here until something settles
                    stalled = True
                    break
                e = _Entry(key)  # type: ignore[arg-type]
                entries[off] = e
                if key is not None:
                    q = keys.get(key)  # type: ignore[arg-type]
                    if q:
                        q.append(off)  # blocked behind an earlier message of its key
                        continue
                    keys[key] = deque((off,))  # type: ignore[index]
                # a first delivery: _lease() inlined, this is the hot path
                e.deliveries = 1
                e.leased = True
                e.deadline = deadline
                e.consumer = consumer
                fresh += 1
                ev_delivered(off)
                out.append((off, 1, deadline))
            self.cursor = base + i
            if stalled:
                break
        self.in_flight += fresh
        self.n_delivered += fresh
        if out:
            # as runs of offsets: held for a whole lease, a list of every offset would
            # cost about 36 bytes a message delivered in the last ack_timeout
            self._expiries.append((deadline, _ranges([g[0] for g in out])))
        return out

    def _admit_restored(
        self,
        off: int,
        e: _Entry,
        key: Key,
        now: float,
        deadline: float,
        consumer: int,
        out: list[Grant],
    ) -> None:
        """Place an offset with recovered history; lease it now if it is due."""
        if key is SKIP:
            self._settle(off, None)
            return
        e.key = key  # type: ignore[assignment]
        self.entries[off] = e
        if key is not None:
            q = self.keys.get(key)  # type: ignore[arg-type]
            if q:
                q.append(off)
                return
            self.keys[key] = deque((off,))  # type: ignore[index]
        if e.not_before > now:
            heapq.heappush(self.delayed, (e.not_before, off))
            return
        out.append(self._lease(off, e, deadline, consumer))
        self.n_redelivered += e.deliveries > 1

    def _lease(self, off: int, e: _Entry, deadline: float, consumer: int) -> Grant:
        e.deliveries += 1
        e.leased = True
        e.deadline = deadline
        e.consumer = consumer
        self.in_flight += 1
        self.n_delivered += 1
        self._ev_delivered.append(off)
        return (off, e.deliveries, deadline)

    def next_due(self) -> float | None:
        """The earliest time at which a retry becomes due or a lease expires, if any."""
        times = []
        if self.delayed:
            times.append(self.delayed[0][0])
        if self._expiries:
            times.append(self._expiries[0][0])
        if self._extended:
            times.append(self._extended[0][0])
        return min(times) if times else None

    def has_ready(self, now: float) -> bool:
        return bool(self.ready) or bool(self.delayed and self.delayed[0][0] <= now)

    # -- settling -------------------------------------------------------------------

    def _current(self, off: int, attempt: int) -> _Entry:
        e = self.entries.get(off)
        if e is None or not e.leased or e.deliveries != attempt:
            if off < self.floor or off in self.settled:
                raise AlreadySettled(self.queue, off, attempt)
            raise LeaseExpired(self.queue, off, attempt, "its lease expired or was released")
        return e

    def check(self, off: int, attempt: int) -> None:
        """Raise LeaseExpired or AlreadySettled unless (off, attempt) holds the lease now.

        Call ``expire(now)`` first so that a lease past its deadline is refused.
        """
        if "unbound-acks" in _CANARIES:
            return  # canary: any receipt goes
        self._current(off, attempt)

    def is_leased(self, off: int, attempt: int, now: float) -> bool:
        e = self.entries.get(off)
        return e is not None and e.leased and e.deliveries == attempt and e.deadline > now

    def ack(self, off: int, attempt: int) -> None:
        """Settle a delivery. Raises LeaseExpired or AlreadySettled for a stale receipt.

        Call ``expire(now)`` first so that a lease past its deadline is refused.
        """
        self.ack_many(((off, attempt),))

    def ack_many(self, receipts: Iterable[tuple[int, int]]) -> None:
        """Settle many deliveries, each named by (offset, attempt), stopping at a stale one."""
        entries = self.entries
        settle = self._settle
        for off, attempt in receipts:
            e = entries.get(off)
            if e is None or not e.leased or e.deliveries != attempt:
                if not ("unbound-acks" in _CANARIES and self._canary_accepts(off, e)):
                    self._current(off, attempt)  # raises the precise error
                    raise AssertionError("unreachable")  # pragma: no cover
                if e is None or not e.leased:
                    continue  # canary: settled already
            e.leased = False
            self.in_flight -= 1
            self.n_acked += 1
            settle(off, e)

    def _canary_accepts(self, off: int, e: _Entry | None) -> bool:
        """Canary unbound-acks: a receipt of any attempt goes. One leased by another
        attempt is settled by the caller; one waiting for redelivery is settled here."""
        if off < self.floor or off in self.settled:
            return True
        if e is None:
            return False
        return e.leased or self.settle_unleased(off)

    def nack(
        self, off: int, attempt: int, now: float, delay_s: float | None, error: str | None
    ) -> DeadLetterAction | None:
        """A failed attempt: redeliver after ``delay_s`` (or the backoff), or dead-letter."""
        e = self._current(off, attempt)
        self.n_nacked += 1
        return self._fail(off, e, now, delay_s, error or "nacked by the consumer")

    def reject(self, off: int, attempt: int, now: float, reason: str) -> DeadLetterAction:
        """Give up on a message at once: it goes to the dead-letter queue."""
        e = self._current(off, attempt)
        self._unlease(e)
        self._note_failure(e, now, reason)
        return self._dead_letter(off, e, f"rejected: {reason}")

    def settle_unleased(self, off: int) -> bool:
        """Settle an offset no consumer holds (a dead letter replayed or purged).

        Returns False if it was already settled; raises if a consumer holds its lease.
        """
        if off < self.floor or off in self.settled:
            return False
        e = self.entries.get(off)
        if e is not None and e.leased:
            raise AlreadySettled(self.queue, off, e.deliveries)
        if e is not None and e.key is not None and self.keys[e.key][0] != off:
            # blocked behind its key's head: take it out of the line
            self.keys[e.key].remove(off)
            del self.entries[off]
            self._ev_failed.pop(off, None)
            e = None
        self._settle(off, e)  # ready or delayed copies are skipped when they come up
        if off >= self.cursor:
            self._restore_end = max(self._restore_end, off + 1)  # the scan checks `settled`
        return True

    def extend(self, off: int, attempt: int, now: float, seconds: float | None) -> float:
        """Push the lease's deadline to ``now + seconds`` (default: the ack timeout)."""
        e = self._current(off, attempt)
        e.deadline = now + (self.ack_timeout if seconds is None else max(0.0, seconds))
        heapq.heappush(self._extended, (e.deadline, off))
        return e.deadline

    def release(self, off: int, attempt: int) -> None:
        """Give a leased message back without spending its failure budget."""
        e = self._current(off, attempt)
        self._unlease(e)
        self.ready.appendleft(off)

    def release_consumer(self, consumer: int) -> int:
        """Release every lease of ``consumer`` (it closed or vanished); returns how many."""
        offs = [off for off, e in self.entries.items() if e.leased and e.consumer == consumer]
        for off in sorted(offs, reverse=True):
            self._unlease(self.entries[off])
            self.ready.appendleft(off)
        return len(offs)

    def expire(self, now: float) -> list[DeadLetterAction]:
        """Treat every lease past its deadline as a failed attempt."""
        actions: list[DeadLetterAction] = []
        exp = self._expiries
        while exp and exp[0][0] <= now:
            _, runs = exp.popleft()
            for start, n in runs:
                for off in range(start, start + n):
                    self._expire_one(off, now, actions)
        ext = self._extended
        while ext and ext[0][0] <= now:
            self._expire_one(heapq.heappop(ext)[1], now, actions)
        return actions

    def _expire_one(self, off: int, now: float, actions: list[DeadLetterAction]) -> None:
        e = self.entries.get(off)
        if e is None or not e.leased or e.deadline > now:
            return  # settled, released or extended since
        self.n_expired += 1
        action = self._fail(off, e, now, None, f"lease expired after {self.ack_timeout:g} s")
        if action is not None:
            actions.append(action)

    def _unlease(self, e: _Entry) -> None:
        if e.leased:
            e.leased = False
            self.in_flight -= 1

    @staticmethod
    def _note_failure(e: _Entry, now: float, error: str) -> None:
        e.failures += 1
        if e.first_fail is None:
            e.first_fail = now
        e.last_fail = now
        e.last_error = error

    def _fail(
        self, off: int, e: _Entry, now: float, delay_s: float | None, error: str
    ) -> DeadLetterAction | None:
        self._unlease(e)
        self._note_failure(e, now, error)
        decision = decide_retry(e.failures, self.max_deliveries, self.backoff, self.rng, delay_s)
        if isinstance(decision, DeadLetter):
            return self._dead_letter(off, e, decision.reason)
        e.not_before = now + decision.delay_s
        self._ev_failed[off] = e
        if decision.delay_s <= 0:
            self.ready.append(off)
        else:
            heapq.heappush(self.delayed, (e.not_before, off))
        return None

    def _dead_letter(self, off: int, e: _Entry, reason: str) -> DeadLetterAction:
        self.n_dead += 1
        action = DeadLetterAction(
            off, reason, e.deliveries, e.failures, e.first_fail, e.last_fail, e.last_error
        )
        self._settle(off, e)
        return action

    def _settle(self, off: int, e: _Entry | None) -> None:
        if e is not None:
            del self.entries[off]
            self._ev_failed.pop(off, None)
        self._ev_settled.append(off)
        if off == self.floor:
            floor = off + 1
            settled = self.settled
            while floor in settled:
                settled.remove(floor)
                floor += 1
            self.floor = floor
        else:
            self.settled.add(off)
        key = e.key if e is not None else None
        if key is not None:
            q = self.keys[key]
            q.popleft()
            if q:
                nxt = q[0]
                ne = self.entries[nxt]
                if ne.not_before > 0 and ne.failures:
                    heapq.heappush(self.delayed, (ne.not_before, nxt))
                else:
                    self.ready.append(nxt)
            else:
                del self.keys[key]

    # -- persistence ----------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self._ev_delivered or self._ev_settled or self._ev_failed)

    def drain(self) -> bytes | None:
        """The changes since the last drain, encoded for the store; None if nothing changed."""
        if not self.dirty:
            return None
        delta = _Delta(
            _ranges(self._ev_delivered),
            _ranges(sorted(self._ev_settled)),
            [
                (off, e.failures, e.first_fail, e.last_fail, e.last_error, e.not_before)
                for off, e in self._ev_failed.items()
            ],
        )
        self._ev_delivered = []
        self._ev_settled = []
        self._ev_failed = {}
        return _snap_enc.encode(delta)

    def snapshot(self) -> bytes:
        """The whole persistent state, replacing every earlier delta."""
        entries = [
            (off, e.deliveries, e.failures, e.first_fail, e.last_fail, e.last_error, e.not_before)
            for off, e in (*self.entries.items(), *self._restored.items())
            if e.deliveries or e.failures
        ]
        return _snap_enc.encode(
            _Snapshot(self.floor, _ranges(sorted(self.settled)), sorted(entries))
        )

    def restore(self, records: Sequence[bytes], first_is_snapshot: bool) -> None:
        """Rebuild from a snapshot and/or deltas, as after a crash: no lease survives."""
        restored = self._restored
        settled = self.settled
        try:
            for i, data in enumerate(records):
                if i == 0 and first_is_snapshot:
                    snap = _snap_dec.decode(data)
                    self.floor = snap.floor
                    for start, length in snap.settled:
                        settled.update(range(start, start + length))
                    for off, d, f, ff, lf, err, nb in snap.entries:
                        e = _Entry(None)
                        e.deliveries, e.failures = d, f
                        e.first_fail, e.last_fail, e.last_error, e.not_before = ff, lf, err, nb
                        restored[off] = e
                    continue
                delta = _delta_dec.decode(data)
                for start, length in delta.delivered:
                    for off in range(start, start + length):
                        r = restored.get(off)
                        if r is None:
                            r = restored[off] = _Entry(None)
                        r.deliveries += 1
                for off, f, ff, lf, err, nb in delta.failed:
                    r = restored.get(off)
                    if r is None:
                        r = restored[off] = _Entry(None)
                    r.failures, r.first_fail, r.last_fail, r.last_error = f, ff, lf, err
                    r.not_before = nb
                for start, length in delta.settled:
                    for off in range(start, start + length):
                        settled.add(off)
                        restored.pop(off, None)
        except msgspec.DecodeError as exc:
            raise StorageError(
                f"consumer state of group {self.group!r} on queue {self.queue!r} is "
                f"unreadable ({exc}); the store is damaged"
            ) from exc
        settled.difference_update([o for o in settled if o < self.floor])
        floor = self.floor
        while floor in settled:
            settled.remove(floor)
            floor += 1
        self.floor = floor
        for off in [o for o in restored if o < floor]:
            del restored[off]
        self.cursor = floor
        ends = [*restored, *settled]
        self._restore_end = max(ends) + 1 if ends else floor

    # -- inspection -----------------------------------------------------------------

    def backlog(self, end: int) -> int:
        """Messages below ``end`` this group has not settled."""
        return max(0, end - self.floor - len(self.settled))
