"""The delivery contracts of SPEC.md §1 as Hypothesis state machines (STYLE.md habit 9).

Each machine drives TWO brokers side by side, one on ``MemoryStorage`` (the reference
store) and one on ``SqliteStorage`` (the durable store), each with its own ``FakeClock``
(advanced identically) and an identically seeded ``random.Random``, plus a pure-Python
model of the contract. Every rule runs on both brokers; the model checks each broker's
observations against the contract table of SPEC.md / VERIFY.md, and while the brokers are
*in sync* their observations must also be identical.

- ``AtLeastOnceDurableMachine``: restarts are clean closes or crashes after a flush, so
  the brokers stay in sync and the model is exact (attempt numbers, retry times, which
  messages the failure budget dead-letters, how many messages a receive must return).
- ``AtLeastOnceCrashMachine``: also crashes with uncommitted group changes.
- ``AtMostOnceMachine``: bounded buffers with drop policies and conflation, late groups,
  crashes and clean restarts.
The at-least-once checks: no acknowledged send lost (a final drain, then an audit of the
dead-letter queue); no redelivery of a settled message in its session, nor after a clean
close or flush; attempt numbers +1 per delivery; per key, deliveries in send order and
never two in flight; stale receipts refused; nothing delivered before its retry time, and
everything due delivered. ``-m slow`` runs bigger variants.

What "identical" means (at-least-once), and why it holds:
- compared: every send's offset; every receive's list of (offset, attempt, id, key, body,
  lease deadline); which message each settle picked; and, after every step, ``stats()``
  minus ``first_offset``/``stored`` (those depend on when the writer thread trimmed acked
  batches, which is real-time scheduling, not semantics); at the end, the drain and the
  dead-letter queue.
- the only actor outside the test's control is the writer thread: it commits group
  changes ``ack_linger_s`` after they happen and expires leases on its housekeeping tick.
  Expiry is made deterministic by forcing it right after every clock advance (a poll of
  limit 0 by a member that never receives, so the tick finds nothing due). Commit timing
  only matters across a crash, so the ``flush+crash`` restart calls
  ``broker.engine.flush().wait()`` before ``abandon()``; after it both brokers restore
  the same state and stay in sync.
- the ``crash`` restart abandons at once. What the writer had committed by then is
  timing-dependent, so from then on the brokers are no longer compared with each other;
  each is still checked against the contract, by a model that allows exactly what a lost
  uncommitted group change can cause (engine invariant 4: "losing them to a crash can
  only cause redelivery"): redelivery of an ack/reject made since the last durable point,
  an attempt number that restarts from the last durable one, and a failure count that
  may be lower (so a message may be retried where the model expected a dead letter).
"""

from __future__ import annotations

import functools
import random
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import arrival
from arrival.errors import NotSupported, ReceiptError
from arrival.storage.base import Storage
from arrival.storage.memory import MemoryStorage
from arrival.storage.sqlite import SqliteStorage
from arrival.testing import FakeClock

Q = "q"
GROUP = "g"
KEYS: list[str | None] = ["a", "b", "c", None]
SLOTS = 2  # consumers per group: members share the group's messages
ACK_TIMEOUT_S = 30.0
MAX_DELIVERIES = 2  # small, so the failure budget runs out within a run
BACKOFF = arrival.Backoff(initial_s=1.0, multiplier=2.0, max_s=60.0, jitter=0.5)
EPS_S = 1e-3  # slack for float rounding of retry times around a 1.7e9 s clock
DRAIN_ADVANCE_S = 10_000.0  # past every lease and retry delay
MAX_DRAIN_ROUNDS = 200

F = TypeVar("F", bound=Callable[..., Any])

FAST = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
LONG = settings(
    max_examples=400,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def skip_unless_slow_selected(request: pytest.FixtureRequest) -> None:
    """Slow variants run only when asked for (``-m slow``), so the default run stays fast."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long variant: run with -m slow")


def body_of(mid: str) -> bytes:
    return f"body of {mid}".encode()


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


def backoff_bounds(failures: int) -> tuple[float, float]:
    """The (shortest, longest) retry delay the queue's backoff can pick after ``failures``."""
    base = min(BACKOFF.max_s, BACKOFF.initial_s * BACKOFF.multiplier ** (failures - 1))
    return base * (1.0 - BACKOFF.jitter), base


# =====================================================================================
# at-least-once
# =====================================================================================

UNSEEN, HELD, WAITING, ACKED, DEAD = "unseen", "held", "waiting", "acked", "dead"
SETTLED = (ACKED, DEAD)


@dataclass
class Alo:
    """The model's knowledge of one message on one broker."""

    mid: str
    key: str | None
    state: str = UNSEEN
    attempt: int = 0  # last attempt observed
    durable_attempt: int = 0  # attempts known committed (at the last flush or close)
    crash_mark: int = 0  # the broker's unflushed-crash count at the last delivery
    failures: int = 0  # nacks + expiries + rejects: an upper bound of the broker's count
    settle_durable: bool = True  # the ack/dead-letter (if any) is known committed
    may_return: bool = False  # settled, but a crash may have taken the settle back
    earliest: float = float("-inf")  # no redelivery before (checked on unfuzzy brokers)
    ready_by: float = float("-inf")  # deliverable by then, once at the head of its key
    slot: int = -1
    msg: arrival.Message | None = None


def mid_of(m: arrival.Message | arrival.DeadMessage) -> str:
    """The model's id of a message: the producer's id or, for a message sent as a bare body
    (the broker then names it ``queue:offset``), the id its body carries."""
    mid = m.id or ""
    if ":" in mid:
        prefix = body_of("")
        if m.body.startswith(prefix):
            return m.body[len(prefix) :].decode(errors="replace")
    return mid


def describe_delivery(m: arrival.Message) -> tuple[object, ...]:
    return (m.offset, m.attempt, m.id, m.key, m.body, m.lease_deadline)


class AloSide:
    """One broker under test and the model of what it may do."""

    def __init__(self, name: str, make_storage: Callable[[], Storage]) -> None:
        self.name = name
        self.make_storage = make_storage
        self.clock = FakeClock()
        self.broker: arrival.Broker | None = None
        self.producer: arrival.Producer | None = None
        self.consumers: list[arrival.Consumer] = []
        self.probe = 0
        self.msgs: dict[str, Alo] = {}
        self.stale: list[arrival.Message] = []  # deliveries whose lease is gone
        self.fuzzy = False  # an unflushed crash happened: commit timing now matters
        self.crashes = 0  # unflushed crashes so far

    # -- lifecycle ---------------------------------------------------------------------

    def open(self, seed: int) -> None:
        b = arrival.connect(self.make_storage(), clock=self.clock, rng=random.Random(seed))
        self.broker = b
        b.create_queue(
            Q,
            "at-least-once",
            ack_timeout=ACK_TIMEOUT_S,
            max_deliveries=MAX_DELIVERIES,
            backoff=BACKOFF,
        )
        self.producer = b.producer()
        self.consumers = [b.consumer(Q, GROUP) for _ in range(SLOTS)]
        self.probe = b.engine.join(Q, GROUP)  # a member that never receives: see expire_now

    @property
    def b(self) -> arrival.Broker:
        assert self.broker is not None
        return self.broker

    def expire_now(self) -> None:
        """Expire every lease due at the current fake time, now rather than on the
        writer's housekeeping tick (a poll expires its group's due leases first)."""
        self.b.engine.poll(self.probe, 0)

    def _release_all_held(self) -> None:
        now = self.clock.now()
        for s in self.msgs.values():
            if s.state == HELD:
                s.state, s.earliest, s.ready_by, s.msg = WAITING, float("-inf"), now, None

    def _all_durable(self) -> None:
        """Everything the broker holds is committed now. Attempts observed before the last
        unflushed crash are not known to be what the broker holds: they stay uncertain."""
        for s in self.msgs.values():
            s.settle_durable = True
            if s.crash_mark == self.crashes:
                s.durable_attempt = s.attempt

    def close(self) -> None:
        self.b.close()
        self._release_all_held()
        self._all_durable()
        self.stale.clear()

    def crash(self, *, flush: bool) -> None:
        engine = self.b.engine
        if flush:
            engine.flush().wait()
        engine.abandon()
        self._release_all_held()
        self.stale.clear()
        if flush:
            self._all_durable()
            return
        self.fuzzy = True
        self.crashes += 1
        for s in self.msgs.values():
            if s.state in SETTLED and not s.settle_durable:
                s.may_return = True

    def close_quietly(self) -> None:
        if self.broker is not None:
            self.broker.close()

    # -- model helpers -----------------------------------------------------------------

    def fail(self, what: str) -> None:
        raise AssertionError(f"[{self.name}] {what}")

    def held(self) -> list[Alo]:
        out = [s for s in self.msgs.values() if s.state == HELD]
        return sorted(out, key=lambda s: s.msg.offset if s.msg else 0)

    def heads(self, by_key: dict[str | None, list[str]]) -> list[Alo]:
        """Per key, the first message the model knows unsettled; every keyless one."""
        out: list[Alo] = []
        for key, mids in by_key.items():
            for mid in mids:
                s = self.msgs[mid]
                if key is None:
                    if s.state not in SETTLED:
                        out.append(s)
                    continue
                if s.state not in SETTLED:
                    out.append(s)
                    break
        return out

    def surely_deliverable(self, by_key: dict[str | None, list[str]], now: float) -> int:
        """How many messages the broker must hand out now. On a fuzzy broker a key makes
        no claim while a settled message before its head may be back and still waiting
        for its retry (``may_return`` with ``ready_by`` in the future)."""
        maybe_waiting = {
            s.key
            for s in self.msgs.values()
            if s.key is not None and s.may_return and s.ready_by > now
        }
        return sum(
            1
            for s in self.heads(by_key)
            if (s.state == UNSEEN or (s.state == WAITING and s.ready_by <= now))
            and (s.key is None or s.key not in maybe_waiting)
        )

    def possibly_deliverable(self, by_key: dict[str | None, list[str]], now: float) -> set[str]:
        return {
            s.mid
            for s in self.heads(by_key)
            if s.state == UNSEEN or (s.state == WAITING and s.earliest <= now)
        }

    def _fail_attempt(self, s: Alo, now: float, delay_s: float | None) -> None:
        """A nack or a lease expiry: retry later, or dead-letter when the budget is spent."""
        s.failures += 1
        s.msg = None
        lo, hi = (delay_s, delay_s) if delay_s is not None else backoff_bounds(s.failures)
        # the retry time if the broker retries it: backoff grows with the failure count,
        # so this bounds a broker that counted fewer failures too
        s.earliest, s.ready_by = now + lo - EPS_S, now + hi + EPS_S
        if s.failures >= MAX_DELIVERIES:
            # exact on an unfuzzy broker; on a fuzzy one the broker may have counted fewer
            # (a lost failure record), so it may legitimately retry it: may_return
            s.state, s.settle_durable, s.may_return = DEAD, False, self.fuzzy
            return
        s.state = WAITING

    # -- observations ------------------------------------------------------------------

    def receive(
        self, slot: int, limit: int, by_key: dict[str | None, list[str]], seq: dict[str, int]
    ) -> list[tuple[object, ...]]:
        now = self.clock.now()
        surely = self.surely_deliverable(by_key, now)
        possibly = self.possibly_deliverable(by_key, now)
        got = self.consumers[slot].receive_batch(limit, timeout=0)
        ids = [mid_of(m) for m in got]
        if surely and not got:
            self.fail(f"receive returned nothing while {surely} message(s) were due (liveness)")
        if not self.fuzzy:
            if len(got) < min(limit, surely):
                self.fail(f"receive({limit}) returned {ids}; {surely} message(s) were due")
            early = [mid for mid in ids if mid not in possibly]
            if early:
                self.fail(f"delivered {early}: not due yet, or blocked behind their key")
        for m in got:
            self.on_delivery(slot, m, by_key, seq)
            self.refuse_old_receipts(m)
        return [describe_delivery(m) for m in got]

    def refuse_old_receipts(self, m: arrival.Message) -> None:
        """An earlier delivery's receipt must not settle the new lease."""
        for old in [x for x in self.stale if mid_of(x) == mid_of(m)]:
            try:
                old.ack()
            except ReceiptError:
                continue
            self.fail(
                f"the receipt of attempt {old.attempt} of {mid_of(m)!r} was honoured while "
                f"attempt {m.attempt} holds the lease"
            )

    def on_delivery(
        self,
        slot: int,
        m: arrival.Message,
        by_key: dict[str | None, list[str]],
        seq: dict[str, int],
    ) -> None:
        mid = mid_of(m)
        s = self.msgs.get(mid)
        if s is None:
            self.fail(f"phantom: delivered {mid_of(m)!r}, which was never sent")
            return
        if m.body != body_of(mid) or m.key != s.key or m.offset != seq[mid]:
            self.fail(f"corrupt: {mid!r} came at offset {m.offset} with {m.body!r}, key {m.key!r}")
        if s.state == HELD:
            self.fail(f"{mid_of(m)!r} delivered while its lease (attempt {s.attempt}) is held")
        if s.state in SETTLED and not s.may_return:
            when = "after a clean close or flush" if s.settle_durable else "in the same session"
            self.fail(f"{mid_of(m)!r} delivered again after it was {s.state} ({when})")
        # attempt numbers: +1 per delivery; after an unflushed crash, restart from the
        # last durable count at worst
        if s.crash_mark == self.crashes:
            if m.attempt != s.attempt + 1:
                self.fail(f"{mid_of(m)!r} attempt {m.attempt}, expected {s.attempt + 1}")
        elif not s.durable_attempt + 1 <= m.attempt <= s.attempt + 1:
            self.fail(
                f"{mid_of(m)!r} attempt {m.attempt} after a crash; expected between "
                f"{s.durable_attempt + 1} and {s.attempt + 1}"
            )
        if s.key is not None:
            for other in by_key[s.key]:
                o = self.msgs[other]
                if other != mid_of(m) and o.state == HELD:
                    self.fail(
                        f"two messages of key {s.key!r} in flight: {other!r} and {mid_of(m)!r}"
                    )
                if seq[other] < seq[mid_of(m)] and o.state not in SETTLED:
                    self.fail(
                        f"{mid_of(m)!r} delivered before {other!r}, sent earlier on key {s.key!r}"
                    )
        s.state, s.attempt, s.crash_mark, s.slot, s.msg = HELD, m.attempt, self.crashes, slot, m
        s.may_return, s.settle_durable = False, True
        s.earliest = s.ready_by = float("-inf")

    def ack(self, s: Alo) -> None:
        assert s.msg is not None
        s.msg.ack()
        s.state, s.settle_durable, s.may_return, s.msg = ACKED, False, False, None

    def ack_slot(self, slot: int) -> list[str]:
        held = [s for s in self.held() if s.slot == slot]
        self.consumers[slot].ack_batch([s.msg for s in held if s.msg is not None])
        for s in held:
            s.state, s.settle_durable, s.may_return, s.msg = ACKED, False, False, None
        return [s.mid for s in held]

    def nack(self, s: Alo, delay_s: float | None) -> None:
        assert s.msg is not None
        msg = s.msg
        msg.nack(delay_s, error="test nack")
        self.stale.append(msg)
        self._fail_attempt(s, self.clock.now(), delay_s)

    def reject(self, s: Alo) -> None:
        assert s.msg is not None
        s.msg.reject("test reject")
        s.failures += 1
        s.state, s.settle_durable, s.may_return, s.msg = DEAD, False, False, None

    def extend(self, s: Alo, seconds: float) -> None:
        assert s.msg is not None
        s.msg.extend(seconds)
        if s.msg.lease_deadline != self.clock.now() + seconds:
            self.fail(f"extend({seconds}) of {s.mid!r} set the deadline {s.msg.lease_deadline}")

    def release(self, s: Alo) -> None:
        """Given back unprocessed: redelivered at once, without spending an attempt."""
        assert s.msg is not None
        s.msg.release()
        self.stale.append(s.msg)
        s.state, s.earliest, s.ready_by, s.msg = WAITING, float("-inf"), self.clock.now(), None

    def advance(self, seconds: float) -> list[str]:
        self.clock.advance(seconds)
        self.expire_now()
        now = self.clock.now()
        expired = []
        for s in self.held():
            assert s.msg is not None
            if s.msg.lease_deadline <= now:
                expired.append(s.mid)
                self.stale.append(s.msg)
                self._fail_attempt(s, now, None)
        return expired

    def reopen_consumer(self, slot: int) -> None:
        now = self.clock.now()
        self.consumers[slot].close()
        for s in self.held():
            if s.slot == slot:
                assert s.msg is not None
                self.stale.append(s.msg)
                s.state, s.earliest, s.ready_by, s.msg = WAITING, float("-inf"), now, None
        self.consumers[slot] = self.b.consumer(Q, GROUP)

    def check_stats(self) -> None:
        for s in self.held():
            assert s.msg is not None
            if s.msg.lease_lost:
                self.fail(f"{s.mid!r} reports its lease lost while the model holds it")
        for m in self.stale:
            if not m.lease_lost:
                self.fail(f"a stale delivery of {mid_of(m)!r} (attempt {m.attempt}) has its lease")
        stats = self.b.stats(Q)
        (g,) = [g for g in stats.groups if g.group == GROUP]
        held = sum(1 for s in self.msgs.values() if s.state == HELD)
        if g.in_flight != held:
            self.fail(f"stats say {g.in_flight} in flight, the model holds {held}")
        unsettled = sum(1 for s in self.msgs.values() if s.state not in SETTLED)
        maybe = sum(1 for s in self.msgs.values() if s.state in SETTLED and s.may_return)
        if not unsettled <= g.backlog <= unsettled + maybe:
            self.fail(f"backlog {g.backlog}, model: {unsettled} unsettled (+{maybe} uncertain)")
        if stats.end_offset != len(self.msgs):
            self.fail(f"end offset {stats.end_offset}, {len(self.msgs)} sends acknowledged")


def comparable_stats(b: arrival.Broker) -> tuple[object, ...]:
    s = b.stats(Q)
    return (s.end_offset, s.sent, s.dropped, s.groups)


class AtLeastOnceMachine(RuleBasedStateMachine):
    """at-least-once: no acknowledged send is lost; redelivery only where SPEC allows it."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.tmp = Path(tempfile.mkdtemp(prefix="arrival-alo-"))
        memory = MemoryStorage()
        self.sides = [
            AloSide("memory", lambda: memory),
            AloSide("sqlite", lambda: SqliteStorage(self.tmp / "data")),
        ]
        self.opens = 0
        self.synced = True
        self.next_id = 0
        self.by_key: dict[str | None, list[str]] = {}
        self.seq: dict[str, int] = {}
        try:
            for side in self.sides:
                side.open(self.opens)
        except BaseException:
            self._cleanup()
            raise

    # -- helpers -----------------------------------------------------------------------

    def agree(self, what: str, results: Sequence[object]) -> None:
        if self.synced and results[0] != results[1]:
            raise AssertionError(
                f"the brokers disagree on {what}: memory={results[0]!r} sqlite={results[1]!r}"
            )

    def new_id(self, key: str | None) -> str:
        mid = f"m{self.next_id}"
        self.seq[mid] = self.next_id
        self.next_id += 1
        self.by_key.setdefault(key, []).append(mid)
        for side in self.sides:
            side.msgs[mid] = Alo(mid, key)
        return mid

    def any_held(self) -> bool:
        return any(side.held() for side in self.sides)

    def reopen_all(self) -> None:
        self.opens += 1
        for side in self.sides:
            side.open(self.opens)

    # -- producing ---------------------------------------------------------------------

    @rule(key=st.sampled_from(KEYS))
    @guarded
    def send(self, key: str | None) -> None:
        mid = self.new_id(key)
        offsets = []
        for side in self.sides:
            assert side.producer is not None
            offsets.append(side.producer.send(Q, body_of(mid), key=key, id=mid))
        # acknowledged sends are durable on both stores, crash or not: offsets always agree
        assert offsets[0] == offsets[1] == self.seq[mid], offsets

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4), bare=st.booleans())
    @guarded
    def send_batch(self, keys: list[str | None], bare: bool) -> None:
        """``bare``: bodies only (no id, no key), the bytes fast path of ``send_batch``."""
        mids = [self.new_id(None if bare else key) for key in keys]
        batch: list[bytes] | list[arrival.Envelope] = (
            [body_of(mid) for mid in mids]
            if bare
            else [
                arrival.Envelope(body_of(m), key=k, id=m) for m, k in zip(mids, keys, strict=True)
            ]
        )
        firsts = []
        for side in self.sides:
            assert side.producer is not None
            firsts.append(side.producer.send_batch(Q, batch))
        assert firsts[0] == firsts[1] == self.seq[mids[0]], firsts

    # -- consuming ---------------------------------------------------------------------

    # one argument, so that Hypothesis (which orders rules by argument count, then name,
    # and favours the first) leans towards receiving rather than towards a restart
    @rule(who=st.tuples(st.integers(0, SLOTS - 1), st.integers(1, 4)))
    @guarded
    def receive(self, who: tuple[int, int]) -> None:
        slot, limit = who
        got = [side.receive(slot, limit, self.by_key, self.seq) for side in self.sides]
        self.agree(f"receive_batch({limit}) by consumer {slot}", got)

    def pick_held(self, i: int, act: Callable[[AloSide, Alo], None]) -> None:
        """Settle the ``i``-th held message (by offset) on each broker: the same one while
        the brokers are in sync."""
        chosen = []
        for side in self.sides:
            held = side.held()
            if held:
                s = held[i % len(held)]
                act(side, s)
                chosen.append(s.mid)
        self.agree("which message was settled", chosen)

    @precondition(lambda self: self.any_held())
    @rule(i=st.integers(0, 100), batch=st.booleans())
    @guarded
    def ack(self, i: int, batch: bool) -> None:
        if batch:  # every message the i-th consumer holds, in one ack_batch
            self.agree("ack_batch", [side.ack_slot(i % SLOTS) for side in self.sides])
        else:
            self.pick_held(i, AloSide.ack)

    @precondition(lambda self: self.any_held())
    @rule(i=st.integers(0, 100), how=st.sampled_from(["nack", 0.0, 2.0, 20.0, "reject"]))
    @guarded
    def fail(self, i: int, how: str | float) -> None:
        """nack (with the queue's backoff, or with a delay in seconds) or reject."""
        if how == "reject":
            self.pick_held(i, AloSide.reject)
        else:
            delay = how if isinstance(how, float) else None
            self.pick_held(i, lambda side, s: side.nack(s, delay))

    @precondition(lambda self: self.any_held())
    @rule(i=st.integers(0, 100), how=st.sampled_from([5.0, 60.0, "release"]))
    @guarded
    def lease(self, i: int, how: str | float) -> None:
        """extend the lease by a number of seconds from now, or release the message."""
        if isinstance(how, float):
            self.pick_held(i, lambda side, s: side.extend(s, how))
        else:
            self.pick_held(i, AloSide.release)

    @precondition(lambda self: any(side.stale for side in self.sides))
    @rule(i=st.integers(0, 100), of_held=st.booleans())
    @guarded
    def ack_stale(self, i: int, of_held: bool) -> None:
        """A receipt whose lease is gone is refused and settles nothing, in particular not
        the newer lease of a message delivered again (``of_held``: pick such a receipt)."""
        for side in self.sides:
            stale = side.stale
            if of_held:
                stale = [m for m in stale if side.msgs[mid_of(m)].state == HELD] or stale
            if not stale:
                continue
            msg = stale[i % len(stale)]
            try:
                msg.ack()
            except ReceiptError:
                continue
            now = side.msgs[mid_of(msg)]
            raise AssertionError(
                f"[{side.name}] a stale receipt was honoured: {describe_delivery(msg)} while "
                f"the message is {now.state} (attempt {now.attempt})"
            )

    @rule(seconds=st.sampled_from([0.5, 1.0, 5.0, 31.0, 100.0]))
    @guarded
    def time_passes(self, seconds: float) -> None:
        self.agree("expired leases", [side.advance(seconds) for side in self.sides])

    # -- crashes and restarts ----------------------------------------------------------

    def restart_both(self, kind: str) -> None:
        """``consumer N``: consumer N leaves the group and a new one joins (its leases are
        released). ``close``: a clean close of the broker. ``crash``: SIGKILL as the store
        sees it, ``abandon()`` commits nothing pending; ``flush+crash`` flushes first. The
        memory store object survives a crash (like a disk); the SQLite store is reopened
        on its directory."""
        if kind.startswith("consumer"):
            for side in self.sides:
                side.reopen_consumer(int(kind.split()[1]))
            return
        for side in self.sides:
            if kind == "close":
                side.close()
            else:
                side.crash(flush=kind == "flush+crash")
        if kind == "crash":
            self.synced = False
        self.reopen_all()

    # -- per-step checks ---------------------------------------------------------------

    @invariant()
    @guarded
    def stats_match_the_model(self) -> None:
        for side in self.sides:
            side.check_stats()
        self.agree("stats", [comparable_stats(side.b) for side in self.sides])

    # -- the end: drain and audit ------------------------------------------------------

    def drain(self) -> None:
        """Release everything, then receive and ack until nothing is left (lockstep)."""
        for side in self.sides:
            for slot in range(SLOTS):
                side.reopen_consumer(slot)
        quiet = 0
        for _ in range(MAX_DRAIN_ROUNDS):
            got = [side.receive(0, 1000, self.by_key, self.seq) for side in self.sides]
            self.agree("drain", got)
            for side in self.sides:
                side.ack_slot(0)
            if any(got):
                quiet = 0
                continue
            quiet += 1
            if quiet == 2:
                return
            self.agree("drain expiries", [side.advance(DRAIN_ADVANCE_S) for side in self.sides])
        raise AssertionError(f"the drain did not finish in {MAX_DRAIN_ROUNDS} rounds")

    def audit(self, side: AloSide) -> list[tuple[object, ...]]:
        dead = side.b.dead_letters(Q).list()
        dlq_ids = [mid_of(d) for d in dead]
        for d in dead:
            assert mid_of(d) is not None
            assert d.body == body_of(mid_of(d)), f"[{side.name}] DLQ entry {mid_of(d)!r} is corrupt"
            assert (d.origin_queue, d.origin_group) == (Q, GROUP)
        dupes = sorted({x for x in dlq_ids if dlq_ids.count(x) > 1}, key=str)
        assert not dupes, f"[{side.name}] dead-lettered twice: {dupes}"
        model_dead = {s.mid for s in side.msgs.values() if s.state == DEAD}
        acked = {s.mid for s in side.msgs.values() if s.state == ACKED}
        lost = sorted(set(side.msgs) - acked - set(dlq_ids), key=self.seq.__getitem__)
        assert not lost, f"[{side.name}] LOST acknowledged messages: {lost}"
        assert set(dlq_ids) == model_dead, (
            f"[{side.name}] DLQ holds {sorted(map(str, dlq_ids))}, the model dead-lettered "
            f"{sorted(model_dead)}"
        )
        (g,) = [g for g in side.b.stats(Q).groups if g.group == GROUP]
        assert (g.backlog, g.in_flight) == (0, 0), f"[{side.name}] left after the drain: {g}"
        return [(d.id, d.attempts, d.reason) for d in dead]

    def nothing_after_clean_close(self) -> None:
        """An ack followed by a clean close is final: a restart delivers nothing."""
        for side in self.sides:
            side.close()
        self.reopen_all()
        for side in self.sides:
            side.clock.advance(DRAIN_ADVANCE_S)
            again = side.consumers[0].receive_batch(1000, timeout=0)
            assert not again, (
                f"[{side.name}] redelivered after acks and a clean close: "
                f"{[describe_delivery(m) for m in again]}"
            )

    def teardown(self) -> None:
        try:
            if not self.broken:
                self.drain()
                self.agree("dead letters", [self.audit(side) for side in self.sides])
                self.nothing_after_clean_close()
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        try:
            for side in self.sides:
                side.close_quietly()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


class AtLeastOnceDurableMachine(AtLeastOnceMachine):
    """Restarts after which every change is committed (clean close, flush then crash): the
    brokers stay in lockstep and the model is exact throughout."""

    @rule(kind=st.sampled_from(["consumer 0", "consumer 1", "close", "flush+crash"]))
    @guarded
    def restart(self, kind: str) -> None:
        self.restart_both(kind)


class AtLeastOnceCrashMachine(AtLeastOnceMachine):
    """Also crashes with group changes (deliveries, acks, failures) not yet committed."""

    @rule(kind=st.sampled_from(["consumer 0", "consumer 1", "close", "flush+crash", "crash"]))
    @guarded
    def restart(self, kind: str) -> None:
        self.restart_both(kind)


TestAtLeastOnceDurable = AtLeastOnceDurableMachine.TestCase
TestAtLeastOnceDurable.settings = FAST
TestAtLeastOnceCrash = AtLeastOnceCrashMachine.TestCase
TestAtLeastOnceCrash.settings = FAST


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("machine", [AtLeastOnceDurableMachine, AtLeastOnceCrashMachine])
def test_at_least_once_long(
    request: pytest.FixtureRequest, machine: type[AtLeastOnceMachine]
) -> None:
    skip_unless_slow_selected(request)
    run_state_machine_as_test(machine, settings=LONG)


# =====================================================================================
# at-most-once
# =====================================================================================

AMQ = "am"
AM_GROUPS = ("a", "b")  # "a" joins before any send; "b" joins late, from the retained buffer


class LossyModel:
    """A pure model of one at-most-once queue, as SPEC describes it: a bounded buffer per
    group that drops the oldest or the newest message on overflow and counts the drop;
    with conflation, a newer message of a key replaces the queued one in its place; a
    group created late starts with the messages still retained (the last ``capacity``)."""

    class Buffer:
        def __init__(self, capacity: int, drop: str, conflate: bool) -> None:
            self.capacity = capacity
            self.drop = drop
            self.items: OrderedDict[object, str] = OrderedDict()  # conflation key -> id
            self.conflate = conflate
            self.dropped = 0
            self.conflated = 0

        def put(self, mid: str, key: str | None) -> None:
            ck: object = mid if key is None or not self.conflate else ("key", key)
            if ck in self.items:
                self.items[ck] = mid
                self.conflated += 1
                return
            if len(self.items) >= self.capacity:
                self.dropped += 1
                if self.drop == "newest":
                    return
                self.items.popitem(last=False)
            self.items[ck] = mid

        def take(self, limit: int) -> list[str]:
            n = min(limit, len(self.items))
            return [self.items.popitem(last=False)[1] for _ in range(n)]

    def __init__(self, capacity: int, drop: str, conflate: bool) -> None:
        self.params = (capacity, drop, conflate)
        self.retained = self.Buffer(*self.params)
        self.groups: dict[str, LossyModel.Buffer] = {}
        self.unclaimed = 0

    def put(self, mid: str, key: str | None) -> None:
        before = self.retained.dropped
        self.retained.put(mid, key)
        if not self.groups:
            self.unclaimed += self.retained.dropped - before
        for buf in self.groups.values():
            buf.put(mid, key)

    def join(self, group: str, keys: dict[str, str | None]) -> None:
        buf = self.Buffer(*self.params)
        for mid in self.retained.items.values():
            buf.put(mid, keys[mid])
        self.groups[group] = buf

    @property
    def dropped(self) -> int:
        return self.unclaimed + sum(b.dropped for b in self.groups.values())


class AmoSide:
    def __init__(self, name: str, make_storage: Callable[[], Storage]) -> None:
        self.name = name
        self.make_storage = make_storage
        self.clock = FakeClock()
        self.broker: arrival.Broker | None = None
        self.producer: arrival.Producer | None = None
        self.consumers: dict[str, arrival.Consumer] = {}

    @property
    def b(self) -> arrival.Broker:
        assert self.broker is not None
        return self.broker

    def open(self, seed: int, capacity: int, drop: str, conflate: bool) -> None:
        self.broker = arrival.connect(
            self.make_storage(), clock=self.clock, rng=random.Random(seed)
        )
        self.broker.create_queue(
            AMQ, "at-most-once", capacity=capacity, drop=drop, conflate=conflate
        )
        self.producer = self.broker.producer()
        self.consumers = {}

    def close_quietly(self) -> None:
        if self.broker is not None:
            self.broker.close()


@dataclass
class Incarnation:
    """What one life of the (in-memory) queue was sent and handed out, per group."""

    model: LossyModel
    sent: list[str]
    sent_to: dict[str, list[str]]  # ids a group could have received (retained + later)
    delivered: dict[str, list[str]]


class AtMostOnceMachine(RuleBasedStateMachine):
    """at-most-once: never a duplicate delivery; loss only as counted drops or crashes."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.tmp = Path(tempfile.mkdtemp(prefix="arrival-amo-"))
        memory = MemoryStorage()
        self.sides = [
            AmoSide("memory", lambda: memory),
            AmoSide("sqlite", lambda: SqliteStorage(self.tmp / "data")),
        ]
        self.params = (1, "oldest", False)
        self.opens = 0
        self.next_id = 0
        self.keys: dict[str, str | None] = {}
        self.seq: dict[str, int] = {}
        self.ever_delivered: dict[str, set[str]] = {g: set() for g in AM_GROUPS}
        self.life: Incarnation | None = None

    @initialize(
        capacity=st.integers(1, 6),
        drop=st.sampled_from(["oldest", "newest"]),
        conflate=st.booleans(),
    )
    @guarded
    def setup(self, capacity: int, drop: str, conflate: bool) -> None:
        self.params = (capacity, drop, conflate)
        self.start_life()

    def start_life(self) -> None:
        for side in self.sides:
            side.open(self.opens, *self.params)
        self.life = Incarnation(LossyModel(*self.params), [], {}, {})
        self.join("a")

    @property
    def lf(self) -> Incarnation:
        assert self.life is not None
        return self.life

    def join(self, group: str) -> None:
        for side in self.sides:
            side.consumers[group] = side.b.consumer(AMQ, group)
        life = self.lf
        life.model.join(group, self.keys)
        life.sent_to[group] = list(life.model.groups[group].items.values())
        life.delivered[group] = []

    def new_id(self, key: str | None) -> str:
        mid = f"n{self.next_id}"
        self.seq[mid] = self.next_id
        self.next_id += 1
        self.keys[mid] = key
        life = self.lf
        life.sent.append(mid)
        life.model.put(mid, key)
        for g in life.sent_to:
            life.sent_to[g].append(mid)
        return mid

    # -- rules -------------------------------------------------------------------------

    @rule(key=st.sampled_from(KEYS))
    @guarded
    def send(self, key: str | None) -> None:
        mid = self.new_id(key)
        for side in self.sides:
            assert side.producer is not None
            assert side.producer.send(AMQ, body_of(mid), key=key, id=mid) is None

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=8), bare=st.booleans())
    @guarded
    def send_batch(self, keys: list[str | None], bare: bool) -> None:
        """``bare``: bodies only (no id, no key), the bytes fast path of ``send_batch``."""
        mids = [self.new_id(None if bare else key) for key in keys]
        batch: list[bytes] | list[arrival.Envelope] = (
            [body_of(mid) for mid in mids]
            if bare
            else [
                arrival.Envelope(body_of(m), key=k, id=m) for m, k in zip(mids, keys, strict=True)
            ]
        )
        for side in self.sides:
            assert side.producer is not None
            assert side.producer.send_batch(AMQ, batch) is None

    @precondition(lambda self: self.life is not None and "b" not in self.life.sent_to)
    @rule()
    @guarded
    def join_late_group(self) -> None:
        self.join("b")

    @precondition(lambda self: self.life is not None)
    @rule(group=st.sampled_from(AM_GROUPS), limit=st.integers(1, 4), nack=st.booleans())
    @guarded
    def receive(self, group: str, limit: int, nack: bool) -> None:
        life = self.lf
        if group not in life.sent_to:
            return
        expected = life.model.groups[group].take(limit)
        results = []
        for side in self.sides:
            got = side.consumers[group].receive_batch(limit, timeout=0)
            ids = [mid_of(m) for m in got]
            for m in got:
                self.check_delivery(side, group, m)
            if got and nack:
                # handed out is processed: nothing to nack, and ack is a harmless no-op
                try:
                    got[0].nack()
                except NotSupported:
                    pass
                else:
                    raise AssertionError(f"[{side.name}] nack accepted on an at-most-once queue")
                got[0].ack()
            assert ids == expected, f"[{side.name}] group {group!r} got {ids}, model {expected}"
            results.append([(m.offset, m.attempt, mid_of(m), m.key, m.body) for m in got])
        assert results[0] == results[1], f"brokers disagree: {results}"
        life.delivered[group].extend(expected)
        self.ever_delivered[group].update(expected)

    def check_delivery(self, side: AmoSide, group: str, m: arrival.Message) -> None:
        """The at-most-once contract on one delivery (independent of the model)."""
        if mid_of(m) not in self.seq:
            raise AssertionError(f"[{side.name}] phantom: {mid_of(m)!r} was never sent")
        if m.body != body_of(mid_of(m)) or m.key != self.keys[mid_of(m)]:
            raise AssertionError(
                f"[{side.name}] corrupt: {mid_of(m)!r} body {m.body!r} key {m.key!r}"
            )
        if mid_of(m) in self.ever_delivered[group]:
            raise AssertionError(f"[{side.name}] DUPLICATE delivery of {mid_of(m)!r} to {group!r}")
        assert m.attempt == 1, m
        life = self.lf
        if m.key is not None:
            # per key, deliveries in send order (a later one may supersede or drop earlier)
            done = [x for x in life.delivered[group] if self.keys[x] == m.key]
            if done and self.seq[done[-1]] > self.seq[mid_of(m)]:
                raise AssertionError(f"[{side.name}] {mid_of(m)!r} delivered after {done[-1]!r}")

    @precondition(lambda self: self.life is not None)
    @rule(clean=st.booleans())
    @guarded
    def restart(self, clean: bool) -> None:
        """Crash (``abandon``) or close, and reopen: at-most-once messages live in memory,
        so what was queued is gone; what was delivered must never come again."""
        for side in self.sides:
            if clean:
                side.b.close()
            else:
                side.b.engine.abandon()
        self.opens += 1
        self.start_life()

    @invariant()
    @guarded
    def every_missing_message_is_counted(self) -> None:
        """Before any crash, sent == delivered + queued + dropped (+ superseded by key)."""
        if self.life is None:
            return
        life = self.lf
        for side in self.sides:
            stats = side.b.stats(AMQ)
            by_group = {g.group: g for g in stats.groups}
            assert stats.dropped == life.model.dropped, (side.name, stats, life.model.dropped)
            for group, could_get in life.sent_to.items():
                gs = by_group[group]
                buf = life.model.groups[group]
                assert (gs.backlog, gs.dropped) == (len(buf.items), buf.dropped), (side.name, gs)
                # the contract, from observations only: every message the group could
                # have received was delivered, is still queued (backlog), was counted as
                # dropped or, with conflation, was superseded by a later one of its key
                got = set(life.delivered[group])
                not_delivered = [x for x in could_get if x not in got]
                missing = len(not_delivered) - gs.backlog
                superseded = sum(
                    1
                    for x in not_delivered
                    if self.keys[x] is not None
                    and any(
                        self.keys[y] == self.keys[x] and self.seq[y] > self.seq[x]
                        for y in could_get
                    )
                )
                slack = superseded if self.params[2] else 0
                assert gs.dropped <= missing <= gs.dropped + slack, (
                    f"[{side.name}] group {group!r}: {missing} missing, {gs.dropped} counted "
                    f"as dropped, {superseded} superseded by key (conflate={self.params[2]})"
                )

    def teardown(self) -> None:
        try:
            if not self.broken and self.life is not None:
                # the end: drain every group; still no duplicates, nothing unsent
                for group in list(self.lf.sent_to):
                    self.receive(group, 10_000, False)
        finally:
            try:
                for side in self.sides:
                    side.close_quietly()
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)


TestAtMostOnce = AtMostOnceMachine.TestCase
TestAtMostOnce.settings = FAST


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_at_most_once_long(request: pytest.FixtureRequest) -> None:
    skip_unless_slow_selected(request)
    run_state_machine_as_test(AtMostOnceMachine, settings=LONG)


# =====================================================================================
# the checkers must be able to fail
# =====================================================================================


def _side_with(msgs: list[tuple[str, str | None]]) -> tuple[AloSide, dict[str | None, list[str]]]:
    side = AloSide("hand-made", MemoryStorage)
    by_key: dict[str | None, list[str]] = {}
    for mid, key in msgs:
        side.msgs[mid] = Alo(mid, key)
        by_key.setdefault(key, []).append(mid)
    return side, by_key


class _FakeMsg:
    """Just the fields the checker reads from a delivered message."""

    def __init__(self, mid: str, key: str | None, attempt: int, body: bytes | None = None) -> None:
        self.id, self.key, self.attempt = mid, key, attempt
        self.body = body_of(mid) if body is None else body
        self.offset, self.lease_deadline = 0, 0.0


def _deliver(side: AloSide, by_key: dict[str | None, list[str]], m: _FakeMsg) -> None:
    seq = {mid: i for i, mid in enumerate(side.msgs)}
    m.offset = seq.get(m.id, -1)
    side.on_delivery(0, m, by_key, seq)  # type: ignore[arg-type]


def test_checker_flags_redelivery_after_durable_ack() -> None:
    side, by_key = _side_with([("m0", "a")])
    _deliver(side, by_key, _FakeMsg("m0", "a", 1))
    side.msgs["m0"].state, side.msgs["m0"].settle_durable = ACKED, False
    side._all_durable()  # a clean close
    with pytest.raises(AssertionError, match="delivered again"):
        _deliver(side, by_key, _FakeMsg("m0", "a", 2))


def test_checker_allows_redelivery_of_an_uncommitted_ack_after_a_crash() -> None:
    side, by_key = _side_with([("m0", "a")])
    _deliver(side, by_key, _FakeMsg("m0", "a", 1))
    side.msgs["m0"].state, side.msgs["m0"].settle_durable = ACKED, False
    side.fuzzy, side.crashes, side.msgs["m0"].may_return = True, 1, True
    _deliver(side, by_key, _FakeMsg("m0", "a", 1))  # the delivery record was lost too: ok
    side.msgs["m0"].state = WAITING  # released; the next delivery is in the same session
    with pytest.raises(AssertionError, match="attempt 1, expected 2"):
        _deliver(side, by_key, _FakeMsg("m0", "a", 1))


def test_checker_flags_order_key_overlap_phantom_and_corruption() -> None:
    side, by_key = _side_with([("m0", "a"), ("m1", "a"), ("m2", None)])
    with pytest.raises(AssertionError, match="sent earlier"):
        _deliver(side, by_key, _FakeMsg("m1", "a", 1))
    side, by_key = _side_with([("m0", "a"), ("m1", "a"), ("m2", None)])
    _deliver(side, by_key, _FakeMsg("m0", "a", 1))
    with pytest.raises(AssertionError, match="two messages of key"):
        _deliver(side, by_key, _FakeMsg("m1", "a", 1))
    with pytest.raises(AssertionError, match="phantom"):
        _deliver(side, by_key, _FakeMsg("zz", None, 1))
    with pytest.raises(AssertionError, match="corrupt"):
        _deliver(side, by_key, _FakeMsg("m2", None, 1, body=b"other"))


def test_checker_flags_a_lost_message_at_the_audit() -> None:
    """A deliberately dropped id: the audit must name it."""
    machine = AtLeastOnceMachine.__new__(AtLeastOnceMachine)
    machine.seq = {"m0": 0, "m1": 1}
    side, _ = _side_with([("m0", None), ("m1", None)])
    side.msgs["m0"].state = ACKED  # m1 was never delivered, acked or dead-lettered

    class _Broker:
        def dead_letters(self, queue: str) -> Any:
            return type("D", (), {"list": lambda self: []})()

    side.broker = _Broker()  # type: ignore[assignment]
    with pytest.raises(AssertionError, match=r"LOST acknowledged messages: \['m1'\]"):
        machine.audit(side)


def test_lossy_model_counts_drops_and_conflation() -> None:
    m = LossyModel(2, "oldest", conflate=False)
    m.join("a", {})
    for i in range(5):
        m.put(f"n{i}", None)
    assert (list(m.groups["a"].items.values()), m.dropped) == (["n3", "n4"], 3)
    m = LossyModel(2, "newest", conflate=True)
    m.join("a", {})
    for mid, key in [("n0", "k"), ("n1", "k"), ("n2", None), ("n3", None)]:
        m.put(mid, key)
    buf = m.groups["a"]
    assert (list(buf.items.values()), buf.dropped, buf.conflated) == (["n1", "n2"], 1, 1)


def test_at_most_once_checker_flags_duplicates_and_phantoms() -> None:
    machine = AtMostOnceMachine.__new__(AtMostOnceMachine)
    machine.seq, machine.keys = {"n0": 0}, {"n0": None}
    machine.ever_delivered = {"a": {"n0"}, "b": set()}
    machine.life = Incarnation(LossyModel(1, "oldest", False), ["n0"], {}, {"a": [], "b": []})
    side = AmoSide("hand-made", MemoryStorage)
    with pytest.raises(AssertionError, match="DUPLICATE delivery of 'n0'"):
        machine.check_delivery(side, "a", _FakeMsg("n0", None, 1))  # type: ignore[arg-type]
    machine.check_delivery(side, "b", _FakeMsg("n0", None, 1))  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="phantom"):
        machine.check_delivery(side, "b", _FakeMsg("n9", None, 1))  # type: ignore[arg-type]


# =====================================================================================
# bugs found by the machines, as deterministic regressions
# =====================================================================================


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_receive_after_an_ack_moves_the_floor_past_the_cursor(kind: str, tmp_path: Path) -> None:
    """Found by AtLeastOnceDurableMachine (a clean close between out-of-order acks), fixed
    in 0ee3092: after a restart, an ack that filled the gap below offsets settled before
    the restart moved the group's floor past its scan cursor; the writer trimmed the
    batches below the floor and the next receive read the cursor's deleted batch
    (StorageError "offset 1 of queue 'q' is not stored"), stuck until a restart."""
    memory = MemoryStorage()

    def store() -> Storage:
        return memory if kind == "memory" else SqliteStorage(tmp_path / "data")

    clock = FakeClock()
    with arrival.connect(store(), clock=clock) as b:
        b.create_queue(Q, "at-least-once")
        for i in range(3):  # three batches: offsets 0, 1, 2
            b.producer().send(Q, body_of(f"m{i}"), id=f"m{i}")
        _m0, m1 = b.consumer(Q, GROUP).receive_batch(2, timeout=0)
        m1.ack()  # settled above the floor, which stays at 0
    with arrival.connect(store(), clock=clock) as b:  # a clean restart
        b.create_queue(Q, "at-least-once")
        c = b.consumer(Q, GROUP)
        m0 = c.receive(timeout=0)  # offset 0 again; the cursor stops at 1
        assert m0 is not None
        assert m0.offset == 0
        m0.ack()  # the floor jumps from 0 to 2, past the cursor
        b.producer().send(Q, body_of("m3"), id="m3")  # this commit trims batches below 2
        m2 = c.receive(timeout=0)
        assert m2 is not None
        assert (m2.offset, m2.id) == (2, "m2")
