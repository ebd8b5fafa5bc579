"""The exactly-once contract of SPEC.md §1 as a Hypothesis state machine (STYLE.md habit 9).

``ExactlyOnceMachine`` drives TWO brokers side by side, one on ``MemoryStorage`` (the
reference store) and one on ``SqliteStorage`` (the durable store), each on its own
``FakeClock`` (advanced identically) with an identically seeded ``random.Random``. Every
rule runs on both; a model per broker checks each one against the contract, and while
the brokers are *in sync* (no crash with work in flight yet) their observations must
also be identical.

Two exactly-once queues: ``in`` is consumed by group ``g`` (two members); transactions
ack messages of ``in`` and send outputs to ``out``, which group ``r`` reads. Rules:
idempotent sends with explicit ``(producer, epoch, sequence)`` through
``engine.send``, retries of earlier sequences, sends repeating stored message ids,
re-registering a producer (fencing the old epoch) and sends from that zombie epoch,
receive, confirmed acks (single and batch), stale acks, transactions ending in commit,
``with``-commit, abort, exception, fencing by a newer holder, timeout, lease expiry,
an ack of one input before the commit, a crash before the commit, while it is in
flight (the writer may or may not have taken it) and just after it returned; time
passing; clean restarts, flush-then-crash and crashes at once; a crash while a send is
in flight, then its retry.

The contract, as checked (VERIFY.md's table, exactly-once column):
1. No acknowledged send is lost: every send's offset is the model's, ``in``'s end offset
   is the number of messages acknowledged, and the final drain delivers every message
   that no confirmed ack or committed transaction settled.
2. No id is stored twice: a retried sequence returns its original offset and stores
   nothing; a repeated id is acknowledged with the original offset and not stored.
3. No message is delivered again to a group after its ack was confirmed (``ack()`` or
   ``commit()`` returned), nor while its lease is held; a receive returns every message
   that is free, up to its limit (nothing is stuck).
4. A transaction's outputs are visible all or none, never before the commit returned,
   never without its acks (torn transaction, dirty read): after every step ``out``
   holds exactly the outputs of committed transactions, in commit order, with their
   deterministic ids, and ``g``'s backlog is exactly the messages not settled.
5. No output of an aborted, refused, timed-out, fenced or crashed transaction is ever
   stored or delivered (aborted read).
6. Fenced producers and transactions never take effect (zombie write).
7. A crash during a commit leaves the transaction wholly committed (outputs and acks)
   or wholly absent, and wholly committed once ``commit()`` returned; a crash during a
   send leaves it stored once or not at all, and its retry settles which.

Bugs the machine found are pinned by regression tests at the end.
``-m slow`` runs a bigger variant.
"""

from __future__ import annotations

import contextlib
import functools
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import arrival
from arrival.errors import (
    AlreadySettled,
    LeaseExpired,
    ProducerFenced,
    ReceiptError,
    TransactionError,
    TransactionTimedOut,
)
from arrival.storage.base import Storage
from arrival.storage.memory import MemoryStorage
from arrival.storage.sqlite import SqliteStorage
from arrival.testing import FakeClock
from conftest import NO_BACKOFF, Stores, engine_of

IN, OUT = "in", "out"
GROUP, READER = "g", "r"
SLOTS = 2  # members of group g
PIDS = ("p1", "p2")
TIDS = ("t1", "t2")
ACK_TIMEOUT_S = 30.0
TX_TIMEOUT_S = 60.0  # longer than a lease, so a lease can expire inside a transaction
SHORT_TX_TIMEOUT_S = 5.0  # the "timeout" outcome: outlived by a 6 s jump, leases survive
OUT_RETENTION_S = 1e9  # keep every output, so the audit reads the whole queue each step
DRAIN_ADVANCE_S = 1000.0  # past every lease
MAX_DRAIN_ROUNDS = 100
PEEK_ALL = 100_000

FREE, HELD, ACKED = "free", "held", "acked"

OUTCOMES = (  # Hypothesis favours the first: the commit, then the crash during it
    "commit",
    "crash-mid-commit",
    "crash-after-commit",
    "lease-expired",
    "fenced",
    "acked-meanwhile",
    "with-commit",
    "exception",
    "abort",
    "timeout",
    "crash-before-commit",
)

F = TypeVar("F", bound=Callable[..., Any])

FAST = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
LONG = settings(
    max_examples=400,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class Boom(Exception):
    """The application's own failure inside a ``with broker.transaction()`` block."""


def skip_unless_slow_selected(request: pytest.FixtureRequest) -> None:
    """Slow variants run only when asked for (``-m slow``), so the default run stays fast."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long variant: run with -m slow")


def guarded(fn: F) -> F:
    """Mark the machine broken when a step fails, so teardown only cleans up and the
    step's own failure is the one reported."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except BaseException:
            self.broken = True
            raise

    return wrapper  # type: ignore[return-value]


def open_queues(b: arrival.Broker) -> None:
    """Both queues redeliver at once (no backoff) and without limit (no dead letters),
    so the model knows exactly what a receive must return."""
    options: dict[str, Any] = {
        "ack_timeout": ACK_TIMEOUT_S,
        "max_deliveries": None,
        "backoff": NO_BACKOFF,
    }
    b.create_queue(IN, "exactly-once", **options)
    b.create_queue(OUT, "exactly-once", retention=OUT_RETENTION_S, **options)


# =====================================================================================
# producers: the client side, shared by both brokers (acknowledged sends are durable on
# both, so their offsets never differ)
# =====================================================================================


Msgs = list[tuple[str | None, str | None, dict[str, str] | None, bytes]]


@dataclass
class ProducerModel:
    pid: str
    epoch: int
    seq: int = 0  # the last sequence acknowledged
    sent: dict[int, tuple[int, Msgs]] = field(default_factory=dict)  # seq -> (offset, msgs)
    zombie: tuple[int, int] | None = None  # (epoch, last seq) of the fenced holder


# =====================================================================================
# one broker and its model
# =====================================================================================


@dataclass
class TxPlan:
    """What a transaction rule does, identically on both brokers."""

    n: int  # the machine's transaction number: makes every output body unique
    tid: str
    take: int  # messages to receive first (by consumer n % SLOTS), as a processor would
    picks: list[int]
    stale: bool
    fanout: int
    extra: int
    outcome: str


class Side:
    """One broker under test and the model of what it must do."""

    def __init__(self, name: str, make_storage: Callable[[], Storage]) -> None:
        self.name = name
        self.make_storage = make_storage
        self.clock = FakeClock()
        self.broker: arrival.Broker | None = None
        self.consumers: list[arrival.Consumer] = []
        self.reader: arrival.Consumer | None = None
        self.probes: tuple[int, int] = (0, 0)
        self.state: dict[int, str] = {}  # offset in `in` -> FREE / HELD / ACKED
        self.held: dict[int, tuple[int, arrival.Message]] = {}  # offset -> (slot, delivery)
        self.stale: list[arrival.Message] = []  # deliveries whose lease is gone
        self.out: list[tuple[str | None, bytes]] = []  # `out`, by offset: (id, body)
        self.forbidden: set[bytes] = set()  # outputs that must never be stored
        self.r_held: dict[int, arrival.Message] = {}
        self.r_acked: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------

    def open(self, seed: int) -> None:
        b = arrival.connect(self.make_storage(), clock=self.clock, rng=random.Random(seed))
        self.broker = b
        open_queues(b)
        self.consumers = [b.consumer(IN, GROUP) for _ in range(SLOTS)]
        self.reader = b.consumer(OUT, READER)
        # members that never receive: a poll of limit 0 expires due leases now, rather
        # than on the writer's housekeeping tick (see expire_now)
        self.probes = (engine_of(b).join(IN, GROUP), engine_of(b).join(OUT, READER))

    @property
    def b(self) -> arrival.Broker:
        assert self.broker is not None
        return self.broker

    def _forget_leases(self) -> None:
        for off in self.held:
            self.state[off] = FREE
        self.held.clear()
        self.stale.clear()
        self.r_held.clear()

    def close(self) -> None:
        self.b.close()
        self._forget_leases()

    def crash(self, *, flush: bool = False) -> None:
        engine = engine_of(self.b)
        if flush:
            engine.flush().wait()
        engine.abandon()
        self._forget_leases()

    def close_quietly(self) -> None:
        if self.broker is not None:
            self.broker.close()

    def fail(self, what: str) -> None:
        raise AssertionError(f"[{self.name}] {what}")

    # -- time --------------------------------------------------------------------------

    def expire_now(self) -> None:
        for probe in self.probes:
            engine_of(self.b).poll(probe, 0)

    def advance(self, seconds: float) -> list[int]:
        """Move the clock; every lease past its deadline is gone. Returns the offsets of
        `in` whose lease expired."""
        self.clock.advance(seconds)
        self.expire_now()
        now = self.clock.now()
        expired = []
        for off, (_slot, m) in sorted(self.held.items()):
            if m.lease_deadline <= now:
                expired.append(off)
                del self.held[off]
                self.state[off] = FREE
                self.stale.append(m)
        for off, m in list(self.r_held.items()):
            if m.lease_deadline <= now:
                del self.r_held[off]
        return expired

    # -- in ----------------------------------------------------------------------------

    def held_sorted(self) -> list[arrival.Message]:
        return [m for _off, (_slot, m) in sorted(self.held.items())]

    def free_count(self) -> int:
        return sum(1 for s in self.state.values() if s == FREE)

    def on_delivery(self, slot: int, m: arrival.Message, sent: Sequence[tuple[str, bytes]]) -> None:
        """The contract on one delivery of `in` to group g."""
        off = m.offset
        if not 0 <= off < len(sent):
            self.fail(f"phantom: offset {off} of {IN!r} delivered, {len(sent)} sent")
        mid, body = sent[off]
        if (m.id, m.body) != (mid, body):
            self.fail(f"corrupt: offset {off} delivered as {(m.id, m.body)}, sent {(mid, body)}")
        state = self.state.get(off)
        if state == ACKED:
            self.fail(
                f"{mid!r} (offset {off}, attempt {m.attempt}) delivered again after its ack "
                f"was confirmed"
            )
        if state == HELD:
            self.fail(f"{mid!r} (offset {off}) delivered while its lease is held")
        if m.lease_deadline != self.clock.now() + ACK_TIMEOUT_S:
            self.fail(f"{mid!r} leased until {m.lease_deadline}, now {self.clock.now()}")
        self.state[off] = HELD
        self.held[off] = (slot, m)

    def receive(
        self, slot: int, limit: int, sent: Sequence[tuple[str, bytes]]
    ) -> list[tuple[object, ...]]:
        free = self.free_count()
        got = self.consumers[slot].receive_batch(limit, timeout=0)
        for m in got:
            self.on_delivery(slot, m, sent)
        if len(got) != min(limit, free):
            self.fail(
                f"receive_batch({limit}) got {len(got)} messages; {free} are free, none "
                f"with a key, no backoff: expected {min(limit, free)}"
            )
        return [(m.offset, m.attempt, m.id, m.body) for m in got]

    def ack(self, m: arrival.Message) -> None:
        m.ack()  # on an exactly-once queue: returns once the ack is durable
        del self.held[m.offset]
        self.state[m.offset] = ACKED

    def ack_slot(self, slot: int) -> list[int]:
        mine = [m for _off, (s, m) in sorted(self.held.items()) if s == slot]
        self.consumers[slot].ack_batch(mine)
        for m in mine:
            del self.held[m.offset]
            self.state[m.offset] = ACKED
        return [m.offset for m in mine]

    def expected_receipt_error(self, m: arrival.Message) -> type[ReceiptError]:
        return AlreadySettled if self.state[m.offset] == ACKED else LeaseExpired

    # -- out ---------------------------------------------------------------------------

    def on_output(self, m: arrival.Message) -> None:
        off = m.offset
        if m.body in self.forbidden:
            self.fail(f"aborted read: {m.body!r} of a transaction that never committed")
        if not 0 <= off < len(self.out):
            self.fail(f"phantom or dirty read: {OUT!r} offset {off} ({m.body!r})")
        mid, body = self.out[off]
        if (m.id, m.body) != (mid or f"{OUT}:{off}", body):
            self.fail(f"output {off} delivered as {(m.id, m.body)}, committed as {(mid, body)}")
        if off in self.r_acked:
            self.fail(f"output {off} ({body!r}) delivered again after its ack was confirmed")
        if off in self.r_held:
            self.fail(f"output {off} ({body!r}) delivered while its lease is held")
        self.r_held[off] = m

    def read_outputs(self, limit: int, ack: bool) -> list[tuple[object, ...]]:
        assert self.reader is not None
        free = len(self.out) - len(self.r_acked) - len(self.r_held)
        got = self.reader.receive_batch(limit, timeout=0)
        for m in got:
            self.on_output(m)
        if len(got) != min(limit, free):
            self.fail(
                f"reader got {len(got)} outputs, {free} are free: expected {min(limit, free)}"
            )
        if ack and got:
            self.reader.ack_batch(got)
            for m in got:
                del self.r_held[m.offset]
                self.r_acked.add(m.offset)
        return [(m.offset, m.attempt, m.id, m.body) for m in got]

    def stored_outputs(self, start: int = 0) -> list[tuple[str | None, bytes]]:
        return [(s.id, s.body) for s in self.b.peek(OUT, PEEK_ALL, start=start)]

    # -- the audit after every step ----------------------------------------------------

    def check(self, n_sent: int) -> None:
        stats = self.b.stats(IN)
        if stats.end_offset != n_sent:
            self.fail(f"{IN!r} ends at {stats.end_offset}; {n_sent} messages acknowledged")
        (g,) = [x for x in stats.groups if x.group == GROUP]
        unsettled = sum(1 for s in self.state.values() if s != ACKED)
        if (g.backlog, g.in_flight) != (unsettled, len(self.held)):
            self.fail(
                f"group {GROUP!r}: backlog {g.backlog}, in flight {g.in_flight}; the model "
                f"has {unsettled} unsettled, {len(self.held)} held (a lost or torn ack?)"
            )
        stored = self.stored_outputs()
        if stored != self.out:
            leaked = [b for _id, b in stored if b in self.forbidden]
            self.fail(
                f"{OUT!r} holds {stored}, committed transactions sent {self.out}"
                + (f"; outputs of transactions that never committed: {leaked}" if leaked else "")
            )
        (r,) = [x for x in self.b.stats(OUT).groups if x.group == READER]
        if (r.backlog, r.in_flight) != (len(self.out) - len(self.r_acked), len(self.r_held)):
            self.fail(f"group {READER!r}: {r}; model: {len(self.out)} outputs, {self.r_acked}")
        for _slot, m in self.held.values():
            if m.lease_lost:
                self.fail(f"{m.id!r} reports its lease lost while the model holds it")
        for m in self.stale:
            if not m.lease_lost:
                self.fail(f"a stale delivery of {m.id!r} (attempt {m.attempt}) has its lease")


def crash_views(
    outputs: Sequence[tuple[str | None, bytes]],
    stored: Sequence[tuple[str | None, bytes]],
    n_inputs: int,
    backlog: int,
    unsettled: int,
) -> dict[str, str]:
    """What a restarted broker shows of a transaction that crashed during its commit:
    its outputs (``stored``: what ``out`` holds past the committed ones) and its acks
    (``backlog``, against the ``unsettled`` inputs before it), each "all", "none" or
    "some"; an empty side shows nothing."""
    views: dict[str, str] = {}
    if outputs:
        views["outputs"] = "all" if list(stored) == list(outputs) else "some" if stored else "none"
    if n_inputs:
        views["acks"] = (
            "all" if backlog == unsettled - n_inputs else "none" if backlog == unsettled else "some"
        )
    return views


def is_torn(views: dict[str, str]) -> bool:
    """A transaction is torn when part of it took effect: some outputs or acks, or the
    outputs without the acks (or the reverse)."""
    return "some" in views.values() or len(set(views.values())) > 1


# =====================================================================================
# the machine
# =====================================================================================


class ExactlyOnceMachine(RuleBasedStateMachine):
    """exactly-once: no loss, no duplicate, no torn or aborted transaction, no zombie."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.tmp = Path(tempfile.mkdtemp(prefix="arrival-eo-"))
        memory = MemoryStorage()
        self.sides = [
            Side("memory", lambda: memory),
            Side("sqlite", lambda: SqliteStorage(self.tmp / "data")),
        ]
        self.opens = 0
        self.synced = True
        self.sent: list[tuple[str, bytes]] = []  # `in` by offset: (Message.id, body)
        self.ids: dict[str, int] = {}  # producer-given id -> offset
        self.next_msg = 0
        self.next_tx = 0
        self.producers: dict[str, ProducerModel] = {}
        try:
            for side in self.sides:
                side.open(self.opens)
            for pid in PIDS:
                self.producers[pid] = ProducerModel(pid, self.register(pid))
        except BaseException:
            self._cleanup()
            raise

    # -- helpers -----------------------------------------------------------------------

    def agree(self, what: str, results: Sequence[object]) -> None:
        if self.synced and results[0] != results[1]:
            raise AssertionError(
                f"the brokers disagree on {what}: memory={results[0]!r} sqlite={results[1]!r}"
            )

    def register(self, pid: str) -> int:
        epochs = [engine_of(side.b).register_producer(pid) for side in self.sides]
        assert epochs[0] == epochs[1], epochs
        return epochs[0]

    def new_messages(self, n: int, named: bool) -> Msgs:
        out: Msgs = []
        for _ in range(n):
            k = self.next_msg
            self.next_msg += 1
            out.append((f"m{k}" if named else None, None, None, f"body {k}".encode()))
        return out

    def store(self, msgs: Msgs) -> int:
        """Add to the catalog what a send of ``msgs`` stores: each message whose id is
        new (ids repeated, also within the batch, are not stored again). Returns the
        offset the send must answer: that of its first message, original or new."""
        first = -1
        for mid, _key, _headers, body in msgs:
            if mid is not None and mid in self.ids:
                off = self.ids[mid]
            else:
                off = len(self.sent)
                self.sent.append((mid if mid is not None else f"{IN}:{off}", body))
                if mid is not None:
                    self.ids[mid] = off
                for side in self.sides:
                    side.state[off] = FREE
            if first < 0:
                first = off
        return first

    def send_on_both(self, msgs: Msgs, producer: tuple[str, int, int] | None) -> int:
        offsets = []
        for side in self.sides:
            ticket = engine_of(side.b).send(IN, msgs, producer)
            assert ticket is not None
            offsets.append(ticket.wait(10.0))
        assert offsets[0] == offsets[1], f"send offsets differ: {offsets}"
        return offsets[0]

    def reopen(self, side: Side) -> None:
        side.open(self.opens)

    def reopen_all(self) -> None:
        self.opens += 1
        for side in self.sides:
            self.reopen(side)

    # -- producing ---------------------------------------------------------------------

    @rule(pid=st.sampled_from(PIDS), n=st.integers(1, 3), named=st.booleans())
    @guarded
    def send(self, pid: str, n: int, named: bool) -> None:
        """An idempotent send of ``n`` new messages (with ids, or bodies only)."""
        p = self.producers[pid]
        msgs = self.new_messages(n, named)
        got = self.send_on_both(msgs, (pid, p.epoch, p.seq + 1))
        expected = self.store(msgs)
        assert got == expected, f"send by {pid} seq {p.seq + 1} stored at {got}, not {expected}"
        p.seq += 1
        p.sent[p.seq] = (got, msgs)

    @precondition(lambda self: any(p.sent for p in self.producers.values()))
    @rule(pid=st.sampled_from(PIDS), back=st.integers(0, 5), changed=st.booleans())
    @guarded
    def retry(self, pid: str, back: int, changed: bool) -> None:
        """A retry of an acknowledged sequence (``changed``: with other content, as a
        buggy client might): the original offset, nothing stored."""
        p = self.producers[pid]
        if not p.sent:
            return
        seqs = sorted(p.sent)
        seq = seqs[max(0, len(seqs) - 1 - back)]
        offset, msgs = p.sent[seq]
        again = self.new_messages(len(msgs), True) if changed else msgs
        got = self.send_on_both(again, (pid, p.epoch, seq))
        assert got == offset, f"retry of {pid} seq {seq} answered {got}, the original {offset}"

    @precondition(lambda self: bool(self.ids))
    @rule(
        picks=st.lists(st.integers(0, 1000), min_size=1, max_size=3),
        fresh=st.integers(0, 2),
        fresh_first=st.booleans(),
        idempotent=st.sampled_from((*PIDS, None)),
    )
    @guarded
    def send_repeated_ids(
        self, picks: list[int], fresh: int, fresh_first: bool, idempotent: str | None
    ) -> None:
        """A batch repeating ids already stored (and maybe one id twice), with new ones
        before or after: only the new ones are stored; the answer is the first
        message's offset, the original one for a repeat."""
        known = sorted(self.ids, key=self.ids.__getitem__)
        repeats: Msgs = [(known[i % len(known)], None, None, b"a repeat") for i in picks]
        new = self.new_messages(fresh, True)
        if new and fresh_first:
            new.append(new[0])  # an id repeated within the batch
        msgs = new + repeats if fresh_first else repeats + new
        producer = None
        p = self.producers[idempotent] if idempotent else None
        if p is not None:
            producer = (p.pid, p.epoch, p.seq + 1)
        got = self.send_on_both(msgs, producer)
        expected = self.store(msgs)
        assert got == expected, f"send of {[m[0] for m in msgs]} answered {got}, not {expected}"
        if p is not None:
            p.seq += 1
            p.sent[p.seq] = (got, msgs)

    @rule(pid=st.sampled_from(PIDS))
    @guarded
    def reregister(self, pid: str) -> None:
        """The producer's id opened again: a new epoch; the old holder is a zombie."""
        p = self.producers[pid]
        epoch = self.register(pid)
        assert epoch > p.epoch, f"{pid} re-registered with epoch {epoch} after {p.epoch}"
        self.producers[pid] = ProducerModel(pid, epoch, zombie=(p.epoch, p.seq))

    @precondition(lambda self: any(p.zombie for p in self.producers.values()))
    @rule(pid=st.sampled_from(PIDS), retry=st.booleans())
    @guarded
    def zombie_send(self, pid: str, retry: bool) -> None:
        """A send (or a retry) by a fenced epoch is refused and stores nothing."""
        z = self.producers[pid].zombie
        if z is None:
            return
        epoch, last = z
        seq = max(1, last) if retry else last + 1
        for side in self.sides:
            with pytest.raises(ProducerFenced):
                engine_of(side.b).send(IN, self.new_messages(1, True), (pid, epoch, seq))

    # -- consuming ---------------------------------------------------------------------

    @rule(who=st.tuples(st.integers(0, SLOTS - 1), st.integers(1, 4)))
    @guarded
    def receive(self, who: tuple[int, int]) -> None:
        slot, limit = who
        got = [side.receive(slot, limit, self.sent) for side in self.sides]
        self.agree(f"receive_batch({limit}) by consumer {slot}", got)

    @precondition(lambda self: any(side.held for side in self.sides))
    @rule(i=st.integers(0, 100), batch=st.booleans())
    @guarded
    def ack(self, i: int, batch: bool) -> None:
        """A confirmed ack: once it returns, the group never gets the message again."""
        chosen = []
        for side in self.sides:
            if batch:
                chosen.append(side.ack_slot(i % SLOTS))
                continue
            held = side.held_sorted()
            if held:
                m = held[i % len(held)]
                side.ack(m)
                chosen.append([m.offset])
        self.agree("acked", chosen)

    @precondition(lambda self: any(side.stale for side in self.sides))
    @rule(i=st.integers(0, 100))
    @guarded
    def ack_stale(self, i: int) -> None:
        """A receipt whose lease is gone is refused and settles nothing."""
        for side in self.sides:
            if side.stale:
                m = side.stale[i % len(side.stale)]
                with pytest.raises(side.expected_receipt_error(m)):
                    m.ack()

    @rule(limit=st.integers(1, 5), ack=st.booleans())
    @guarded
    def read_outputs(self, limit: int, ack: bool) -> None:
        """Group r reads ``out``: only committed outputs, each once after its ack."""
        self.agree("outputs read", [side.read_outputs(limit, ack) for side in self.sides])

    @rule(seconds=st.sampled_from([1.0, 10.0, ACK_TIMEOUT_S + 1, 100.0]))
    @guarded
    def time_passes(self, seconds: float) -> None:
        self.agree("expired leases", [side.advance(seconds) for side in self.sides])

    # -- transactions ------------------------------------------------------------------

    @rule(
        tid=st.sampled_from(TIDS),
        take=st.integers(0, 3),
        picks=st.lists(st.integers(0, 100), min_size=1, max_size=3),
        stale=st.booleans(),
        fanout=st.integers(0, 2),
        extra=st.integers(0, 2),
        outcome=st.sampled_from(OUTCOMES),
    )
    @guarded
    def transaction(
        self,
        tid: str,
        take: int,
        picks: list[int],
        stale: bool,
        fanout: int,
        extra: int,
        outcome: str,
    ) -> None:
        """A transaction acking messages of ``in`` (``take`` received now, then ``picks``
        among all those held; ``stale``: also one whose lease is gone), sending
        ``fanout`` outputs per input plus ``extra`` more to ``out``, ending in
        ``outcome``."""
        plan = TxPlan(self.next_tx, tid, take, picks, stale, fanout, extra, outcome)
        self.next_tx += 1
        results = [self.run_transaction(side, plan) for side in self.sides]
        if outcome.startswith("crash"):
            self.opens += 1
            for side in self.sides:
                self.reopen(side)
            results = [
                self.settle_crashed_transaction(side, plan, r)
                for side, r in zip(self.sides, results, strict=True)
            ]
            self.synced = False
        self.agree(f"transaction {plan}", results)

    def fill(
        self, tx: arrival.Transaction, plan: TxPlan, inputs: list[arrival.Message]
    ) -> list[tuple[str | None, bytes]]:
        """Ack ``inputs`` and send the plan's outputs; returns the outputs a commit stores."""
        outputs: list[tuple[str | None, bytes]] = []
        for m in inputs:
            tx.ack(m)
            for j in range(plan.fanout):
                body = f"tx{plan.n} {m.id} #{j}".encode()
                tx.send(OUT, body, source=m)
                outputs.append((f"{m.id}/{j}", body))
        distinct = list(dict.fromkeys(m.id for m in inputs))
        for j in range(plan.extra):
            body = f"tx{plan.n} extra #{j}".encode()
            tx.send(OUT, body)
            # without a source, an output is named after the transaction's sole input
            mid = f"{distinct[0]}/{plan.fanout + j}" if len(distinct) == 1 else None
            outputs.append((mid, body))
        return outputs

    @staticmethod
    def receipt_error(side: Side, msgs: list[arrival.Message]) -> type[ReceiptError] | None:
        """The error a commit acking ``msgs`` must raise now, if any receipt is stale."""
        errors = set()
        for m in msgs:
            current = side.held.get(m.offset)
            if current is None or current[1] is not m:
                errors.add(side.expected_receipt_error(m))
        if not errors:
            return None
        return errors.pop() if len(errors) == 1 else ReceiptError

    def run_transaction(self, side: Side, plan: TxPlan) -> tuple[object, ...]:
        if plan.take:
            side.receive(plan.n % SLOTS, plan.take, self.sent)
        held = side.held_sorted()
        chosen = [held[i % len(held)] for i in plan.picks] if held else []
        inputs = list({m.offset: m for m in chosen}.values())
        acks = list(inputs)
        if plan.stale and side.stale:
            acks.append(side.stale[plan.n % len(side.stale)])
        timeout = SHORT_TX_TIMEOUT_S if plan.outcome == "timeout" else TX_TIMEOUT_S
        outcome = plan.outcome
        offsets = [m.offset for m in inputs]

        if outcome in ("with-commit", "exception"):
            outputs: list[tuple[str | None, bytes]] = []
            expected = self.receipt_error(side, acks) if outcome == "with-commit" else Boom
            with (
                pytest.raises(expected) if expected else contextlib.nullcontext(),
                side.b.transaction(plan.tid, timeout=timeout) as tx,
            ):
                outputs = self.fill(tx, plan, acks)
                if outcome == "exception":
                    raise Boom("the handler failed")
            return self.finish(side, tx, outcome, expected, inputs, outputs)

        tx = side.b.transaction(plan.tid, timeout=timeout)
        outputs = self.fill(tx, plan, acks)
        if outcome == "abort":
            tx.abort()
            with pytest.raises(TransactionError):
                tx.commit()
            return self.finish(side, tx, outcome, TransactionError, inputs, outputs)
        if outcome == "crash-before-commit":
            side.crash()
            return ("crashed", offsets, outputs, None)
        if outcome in ("crash-mid-commit", "crash-after-commit"):
            refused = self.receipt_error(side, acks)
            if refused is not None:
                with pytest.raises(refused):
                    tx._core.submit()
            else:
                # the first half of commit(): the engine has it, the writer may not yet
                ticket = tx._core.submit()
                if outcome == "crash-after-commit":
                    ticket.wait(10.0)  # commit() would return now
                elif plan.n % 2:
                    time.sleep(0)  # yield: the writer may now take the commit, or not yet
            side.crash()
            return ("crashed", offsets, outputs, refused)

        newer_first = False
        if outcome == "fenced":
            # a newer holder of the same id opens it, and commits before or after the
            # zombie tries to: either way the zombie's commit is refused
            newer = side.b.transaction(plan.tid)
            newer_body = f"tx{plan.n} newer holder".encode()
            newer.send(OUT, newer_body)
            newer_first = plan.fanout % 2 == 0
            if newer_first:
                newer.commit()
                side.out.append((None, newer_body))
        elif outcome == "timeout":
            side.advance(SHORT_TX_TIMEOUT_S + 1)
        elif outcome == "lease-expired":
            side.advance(ACK_TIMEOUT_S + 1)
        elif outcome == "acked-meanwhile" and inputs:
            side.ack(inputs[0])  # confirmed: the transaction's ack of it is now stale
        expected = {"fenced": ProducerFenced, "timeout": TransactionTimedOut}.get(outcome)
        if expected is None:
            expected = self.receipt_error(side, acks)
        with pytest.raises(expected) if expected else contextlib.nullcontext():
            tx.commit()
        if outcome == "fenced" and not newer_first:
            newer.commit()
            side.out.append((None, newer_body))
        return self.finish(side, tx, outcome, expected, inputs, outputs)

    def finish(
        self,
        side: Side,
        tx: arrival.Transaction,
        outcome: str,
        error: type[BaseException] | None,
        inputs: list[arrival.Message],
        outputs: list[tuple[str | None, bytes]],
    ) -> tuple[object, ...]:
        """Record a transaction that ended without a crash."""
        if error is None:
            if tx.state != "committed":
                side.fail(f"{tx!r} committed, but its state is {tx.state!r}")
            for m in inputs:
                del side.held[m.offset]
                side.state[m.offset] = ACKED
            side.out.extend(outputs)
        else:
            if tx.state != "aborted":
                side.fail(f"{tx!r} ended with {error.__name__}, but its state is {tx.state!r}")
            side.forbidden.update(body for _mid, body in outputs)
            with pytest.raises(TransactionError):
                tx.commit()  # an ended transaction cannot be committed after all
        name = None if error is None else error.__name__
        return (outcome, name, [m.offset for m in inputs], outputs)

    def settle_crashed_transaction(
        self, side: Side, plan: TxPlan, result: tuple[object, ...]
    ) -> tuple[object, ...]:
        """After the restart: a transaction that crashed before its commit left nothing;
        one that crashed during it left everything (outputs and acks) or nothing; one
        whose commit had returned left everything."""
        _what, offsets, outputs, refused = result
        assert isinstance(offsets, list)
        assert isinstance(outputs, list)
        if plan.outcome == "crash-before-commit" or refused is not None:
            side.forbidden.update(body for _mid, body in outputs)
            return result
        stored = side.stored_outputs(start=len(side.out))
        (g,) = [x for x in side.b.stats(IN).groups if x.group == GROUP]
        unsettled = sum(1 for s in side.state.values() if s != ACKED)
        views = crash_views(outputs, stored, len(offsets), g.backlog, unsettled)
        if is_torn(views):
            side.fail(
                f"TORN transaction after a crash during its commit: {views}; outputs "
                f"{outputs}, stored {stored}; inputs {offsets}, backlog {g.backlog} of "
                f"{unsettled} unsettled"
            )
        if plan.outcome == "crash-after-commit" and "none" in views.values():
            side.fail(f"a committed transaction was lost in a crash: {views}")
        if "all" in views.values():
            for off in offsets:
                side.state[off] = ACKED
            side.out.extend(outputs)
        else:
            side.forbidden.update(body for _mid, body in outputs)
        return (plan.outcome, sorted(set(views.values())))

    # -- crashes and restarts ----------------------------------------------------------

    @rule(kind=st.sampled_from(["close", "flush+crash", "crash"]))
    @guarded
    def restart(self, kind: str) -> None:
        """``close``: clean. ``crash``: SIGKILL as the store sees it (``abandon()`` commits
        nothing pending); ``flush+crash`` flushes first, so the brokers stay in sync.
        The memory store object survives, like a disk; SQLite reopens its directory.
        Producers live on (clients of a broker that restarted)."""
        for side in self.sides:
            if kind == "close":
                side.close()
            else:
                side.crash(flush=kind == "flush+crash")
        if kind == "crash":
            self.synced = False
        self.reopen_all()

    @rule(pid=st.sampled_from(PIDS), n=st.integers(1, 3))
    @guarded
    def crash_during_send(self, pid: str, n: int) -> None:
        """The broker dies while a send is in flight (committed or not: a race with the
        writer); the producer retries the same sequence after the restart. Either way
        the message is stored once, at the offset it was given."""
        p = self.producers[pid]
        msgs = self.new_messages(n, True)
        for side in self.sides:
            engine_of(side.b).send(IN, msgs, (pid, p.epoch, p.seq + 1))  # not waited for
            side.crash()
        self.synced = False
        self.reopen_all()
        got = self.send_on_both(msgs, (pid, p.epoch, p.seq + 1))
        expected = self.store(msgs)
        assert got == expected, f"the retry after a crash answered {got}, not {expected}"
        p.seq += 1
        p.sent[p.seq] = (got, msgs)

    # -- per-step checks ---------------------------------------------------------------

    @invariant()
    @guarded
    def brokers_match_the_model(self) -> None:
        for side in self.sides:
            side.check(len(self.sent))

    # -- the end: drain and audit ------------------------------------------------------

    def drain(self) -> None:
        """Let every lease expire, then receive and ack everything left, in both groups."""
        for side in self.sides:
            side.advance(DRAIN_ADVANCE_S)
        for _ in range(MAX_DRAIN_ROUNDS):
            got = [side.receive(0, 1000, self.sent) for side in self.sides]
            for side in self.sides:
                side.ack_slot(0)
            outs = [side.read_outputs(1000, True) for side in self.sides]
            if not any(got) and not any(outs):
                break
        else:
            raise AssertionError(f"the drain did not finish in {MAX_DRAIN_ROUNDS} rounds")
        for side in self.sides:
            lost = sorted(off for off, s in side.state.items() if s != ACKED)
            if lost:
                side.fail(f"LOST acknowledged messages: {[self.sent[o] for o in lost]}")
            if side.r_acked != set(range(len(side.out))):
                side.fail(f"outputs never delivered: {set(range(len(side.out))) - side.r_acked}")

    def nothing_after_clean_close(self) -> None:
        """Everything was acked: a clean restart delivers nothing, in either group."""
        for side in self.sides:
            side.close()
        self.reopen_all()
        for side in self.sides:
            side.advance(DRAIN_ADVANCE_S)
            again = side.consumers[0].receive_batch(1000, timeout=0)
            assert side.reader is not None
            again += side.reader.receive_batch(1000, timeout=0)
            assert not again, f"[{side.name}] redelivered after confirmed acks: {again}"

    def teardown(self) -> None:
        try:
            if not self.broken:
                self.drain()
                self.nothing_after_clean_close()
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        try:
            for side in self.sides:
                side.close_quietly()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


TestExactlyOnce = ExactlyOnceMachine.TestCase
TestExactlyOnce.settings = FAST


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_exactly_once_long(request: pytest.FixtureRequest) -> None:
    skip_unless_slow_selected(request)
    run_state_machine_as_test(ExactlyOnceMachine, settings=LONG)


# =====================================================================================
# the checkers must be able to fail
# =====================================================================================


class _FakeMsg:
    """Just the fields the checkers read from a delivered message."""

    def __init__(self, offset: int, mid: str, body: bytes, deadline: float = 0.0) -> None:
        self.offset, self.id, self.body, self.attempt = offset, mid, body, 2
        self.lease_deadline = deadline


def test_checker_flags_a_delivery_after_a_confirmed_ack() -> None:
    side = Side("hand-made", MemoryStorage)
    sent = [("m0", b"body 0"), ("m1", b"body 1")]
    side.state = {0: ACKED, 1: FREE}
    deadline = side.clock.now() + ACK_TIMEOUT_S
    side.on_delivery(0, _FakeMsg(1, "m1", b"body 1", deadline), sent)  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="delivered again after its ack was confirmed"):
        side.on_delivery(0, _FakeMsg(0, "m0", b"body 0", deadline), sent)  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="while its lease is held"):
        side.on_delivery(1, _FakeMsg(1, "m1", b"body 1", deadline), sent)  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="phantom"):
        side.on_delivery(0, _FakeMsg(7, "m7", b"body 7", deadline), sent)  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="corrupt"):
        side.on_delivery(0, _FakeMsg(1, "m1", b"other", deadline), sent)  # type: ignore[arg-type]


def test_checker_flags_aborted_dirty_and_repeated_reads_of_outputs() -> None:
    side = Side("hand-made", MemoryStorage)
    side.out = [("m0/0", b"tx0 m0 #0")]
    side.forbidden = {b"tx1 m1 #0"}
    with pytest.raises(AssertionError, match="aborted read"):
        side.on_output(_FakeMsg(1, "m1/0", b"tx1 m1 #0"))  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="dirty read"):
        side.on_output(_FakeMsg(1, "m2/0", b"tx2 m2 #0"))  # type: ignore[arg-type]
    side.r_acked = {0}
    with pytest.raises(AssertionError, match="after its ack was confirmed"):
        side.on_output(_FakeMsg(0, "m0/0", b"tx0 m0 #0"))  # type: ignore[arg-type]


def test_checker_flags_a_torn_transaction() -> None:
    outs = [("m0/0", b"a"), ("m0/1", b"b")]
    assert not is_torn(crash_views(outs, outs, 1, 4, 5))  # all of it
    assert not is_torn(crash_views(outs, [], 1, 5, 5))  # none of it
    assert not is_torn(crash_views([], [], 0, 5, 5))  # nothing to see
    assert is_torn(crash_views(outs, outs[:1], 1, 4, 5))  # some outputs
    assert is_torn(crash_views(outs, outs, 1, 5, 5))  # outputs without the ack
    assert is_torn(crash_views(outs, [], 1, 4, 5))  # the ack without the outputs
    assert is_torn(crash_views([], [], 2, 4, 5))  # one of two acks


# =====================================================================================
# bugs found by the machine, as deterministic regressions
# =====================================================================================


def _reopen(stores: Stores, b: arrival.Broker) -> arrival.Broker:
    stores.crash(b)
    b = stores.open()
    open_queues(b)
    return b


def test_producer_fence_survives_a_crash(stores: Stores) -> None:
    """Found by ExactlyOnceMachine (reregister after a crash). A producer re-opened under
    its id fences the old holder; the fence must outlive a broker restart, like
    everything acknowledged. (That a crash could hand the same epoch out twice was fixed
    in 9497c02: the last assertion guards it.)"""
    b = stores.open()
    open_queues(b)
    e = engine_of(b)
    old = e.register_producer("p")
    assert e.send(IN, [("a", None, None, b"a")], ("p", old, 1)).wait(10.0) == 0  # type: ignore[union-attr]
    new = e.register_producer("p")
    assert new > old
    with pytest.raises(ProducerFenced):
        e.send(IN, [("b", None, None, b"b")], ("p", old, 2))
    b = _reopen(stores, b)
    with pytest.raises(ProducerFenced):
        engine_of(b).send(IN, [("b", None, None, b"b")], ("p", old, 2))
    assert b.stats(IN).end_offset == 1
    assert engine_of(b).register_producer("p") > new


def test_all_repeat_send_keeps_its_sequence_across_a_crash(stores: Stores) -> None:
    """Found by ExactlyOnceMachine (send_repeated_ids with only repeats, then a crash,
    then the next send of that producer)."""
    b = stores.open()
    open_queues(b)
    e = engine_of(b)
    epoch = e.register_producer("p")
    e.flush().wait(10.0)
    assert e.send(IN, [("a", None, None, b"a")], ("p", epoch, 1)).wait(10.0) == 0  # type: ignore[union-attr]
    # acknowledged, stores nothing: "a" is there already
    assert e.send(IN, [("a", None, None, b"a")], ("p", epoch, 2)).wait(10.0) == 0  # type: ignore[union-attr]
    b = _reopen(stores, b)
    assert engine_of(b).send(IN, [("b", None, None, b"b")], ("p", epoch, 3)).wait(10.0) == 1  # type: ignore[union-attr]
    assert b.stats(IN).end_offset == 2
