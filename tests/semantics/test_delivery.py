"""Unit tests of arrival.semantics.delivery.GroupState on a fake time and a seeded Random.

Time is a plain float passed as ``now``; the log is a python list of keys served in
batches by ``Log`` (the ``keys_at`` callable GroupState reads the log through).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from arrival.errors import AlreadySettled, LeaseExpired, StorageError
from arrival.model import Backoff
from arrival.semantics.delivery import SKIP, DeadLetterAction, Grant, GroupState, Key

ACK_TIMEOUT = 10.0
# no jitter, so retry times are exact: failure n waits min(8, 2**(n-1)) s
STEADY = Backoff(initial_s=1.0, multiplier=2.0, max_s=8.0, jitter=0.0)


class Log:
    """The keys of a log, readable in batches as the engine's ``keys_at`` serves them."""

    def __init__(self, keys: Sequence[Key] = (), sizes: Sequence[int] | None = None) -> None:
        self.keys: list[Key] = []
        self.bases: list[int] = []
        self.batches: list[list[Key]] = []
        self.append(keys, sizes)

    def append(self, keys: Sequence[Key], sizes: Sequence[int] | None = None) -> None:
        """Append ``keys`` in batches of ``sizes`` (cycled; one batch by default)."""
        keys = list(keys)
        sizes = list(sizes or [max(1, len(keys))])
        i = n = 0
        while i < len(keys):
            size = sizes[n % len(sizes)]
            self.bases.append(len(self.keys))
            self.batches.append(keys[i : i + size])
            self.keys += keys[i : i + size]
            i += size
            n += 1

    def __call__(self, off: int) -> tuple[int, Sequence[Key]] | None:
        if off >= len(self.keys):
            return None
        b = bisect.bisect_right(self.bases, off) - 1
        return self.bases[b], self.batches[b]

    def __len__(self) -> int:
        return len(self.keys)


def make_state(
    *,
    max_deliveries: int | None = 3,
    backoff: Backoff = STEADY,
    ack_timeout: float = ACK_TIMEOUT,
    seed: int = 0,
    start: int = 0,
) -> GroupState:
    return GroupState(
        "orders",
        "billing",
        start,
        ack_timeout=ack_timeout,
        max_deliveries=max_deliveries,
        backoff=backoff,
        rng=random.Random(seed),
    )


def offs(grants: list[Grant]) -> list[int]:
    return [g[0] for g in grants]


def attempts(grants: list[Grant]) -> dict[int, int]:
    return {off: attempt for off, attempt, _ in grants}


# -- granting -----------------------------------------------------------------------------


def test_grant_in_log_order_up_to_the_limit() -> None:
    s = make_state()
    log = Log([None] * 10)
    g = s.grant(100.0, 3, 1, log)
    assert g == [(0, 1, 110.0), (1, 1, 110.0), (2, 1, 110.0)]
    assert offs(s.grant(101.0, 4, 1, log)) == [3, 4, 5, 6]
    assert s.grant(101.0, 0, 1, log) == []
    assert s.grant(101.0, -1, 1, log) == []
    assert offs(s.grant(102.0, 100, 2, log)) == [7, 8, 9]
    assert s.grant(102.0, 100, 2, log) == []
    assert s.in_flight == 10
    assert s.cursor == 10


def test_grant_starts_at_the_start_offset() -> None:
    s = make_state(start=4)
    assert offs(s.grant(0.0, 10, 1, Log([None] * 6))) == [4, 5]
    assert s.floor == 4


def test_grant_picks_up_messages_appended_later() -> None:
    s = make_state()
    log = Log()
    assert s.grant(0.0, 5, 1, log) == []
    log.append(["a", None])
    assert offs(s.grant(0.0, 5, 1, log)) == [0, 1]
    assert s.grant(0.0, 5, 1, log) == []
    log.append([None, "b", "a"])
    assert offs(s.grant(0.0, 5, 1, log)) == [2, 3]  # 4 waits behind key "a"


KEYS: list[Key] = ["a", "b", None, "a", "c", None, "b", "a", None, "c", "c", None, "d", "a"]


def run_to_completion(log: Log, limit: int) -> list[list[int]]:
    """Grant ``limit`` at a time, acking every grant, until the log is settled."""
    s = make_state()
    rounds: list[list[int]] = []
    for _ in range(100):
        g = s.grant(0.0, limit, 1, log)
        if not g:
            break
        rounds.append(offs(g))
        for off, attempt, _ in g:
            s.ack(off, attempt)
    assert s.floor == len(log)
    assert s.in_flight == 0
    return rounds


@pytest.mark.parametrize("sizes", [[1], [2], [3, 1, 4], [5], [7, 2], [len(KEYS)]])
@pytest.mark.parametrize("limit", [1, 2, 3, 100])
def test_batch_boundaries_do_not_change_what_is_granted(sizes: list[int], limit: int) -> None:
    expected = run_to_completion(Log(KEYS), limit)
    got = run_to_completion(Log(KEYS, sizes), limit)
    assert got == expected
    flat = [off for r in got for off in r]
    assert sorted(flat) == list(range(len(KEYS)))  # each offset exactly once


def test_batch_boundaries_with_all_keys_distinct_grants_everything_at_once() -> None:
    log = Log([None, "a", "b", None, "c"], sizes=[2, 1])
    s = make_state()
    assert offs(s.grant(0.0, 100, 1, log)) == [0, 1, 2, 3, 4]


def test_limit_stops_mid_batch_and_resumes_at_the_next_offset() -> None:
    log = Log([None] * 9, sizes=[4, 5])
    s = make_state()
    assert offs(s.grant(0.0, 3, 1, log)) == [0, 1, 2]
    assert s.cursor == 3
    assert offs(s.grant(0.0, 2, 1, log)) == [3, 4]  # crosses the batch boundary
    assert offs(s.grant(0.0, 2, 1, log)) == [5, 6]


def test_attempt_numbers_start_at_one_and_grow_per_delivery() -> None:
    s = make_state(max_deliveries=None)
    log = Log([None])
    assert s.grant(0.0, 1, 1, log) == [(0, 1, 10.0)]
    s.nack(0, 1, 1.0, 0.0, "e1")
    assert s.grant(1.0, 1, 1, log) == [(0, 2, 11.0)]
    assert s.expire(11.0) == []
    assert s.grant(13.0, 1, 1, log) == [(0, 3, 23.0)]  # after the 2 s backoff
    s.release(0, 3)
    assert s.grant(14.0, 1, 1, log) == [(0, 4, 24.0)]


# -- acking -------------------------------------------------------------------------------


def test_ack_settles_and_advances_the_floor() -> None:
    s = make_state()
    log = Log([None] * 3)
    s.grant(0.0, 3, 1, log)
    assert s.backlog(3) == 3
    s.ack(0, 1)
    assert s.floor == 1
    assert s.in_flight == 2
    assert s.backlog(3) == 2
    assert s.grant(0.0, 10, 1, log) == []  # never redelivered


def test_out_of_order_acks_hold_the_floor_until_the_gap_fills() -> None:
    s = make_state()
    log = Log([None] * 5)
    s.grant(0.0, 5, 1, log)
    s.ack(2, 1)
    s.ack(4, 1)
    assert s.floor == 0
    assert s.settled == {2, 4}
    assert s.backlog(5) == 3
    s.ack(0, 1)
    assert s.floor == 1
    s.ack(1, 1)
    assert s.floor == 3  # 2 was already settled
    assert s.settled == {4}
    s.ack(3, 1)
    assert s.floor == 5
    assert s.settled == set()
    assert s.backlog(5) == 0


def test_ack_with_a_wrong_attempt_is_refused_and_keeps_the_lease() -> None:
    s = make_state()
    s.grant(0.0, 1, 1, Log([None]))
    with pytest.raises(LeaseExpired) as info:
        s.ack(0, 2)
    assert (info.value.queue, info.value.offset, info.value.attempt) == ("orders", 0, 2)
    assert "attempt 2" in str(info.value)
    assert s.in_flight == 1
    s.ack(0, 1)  # the real receipt still works
    assert s.floor == 1


def test_ack_of_an_earlier_attempt_after_redelivery_is_refused() -> None:
    s = make_state()
    log = Log([None])
    s.grant(0.0, 1, 1, log)
    s.nack(0, 1, 0.0, 0.0, None)
    with pytest.raises(LeaseExpired):
        s.ack(0, 1)  # not leased at all right now
    assert s.grant(0.0, 1, 1, log)[0][:2] == (0, 2)
    with pytest.raises(LeaseExpired):
        s.ack(0, 1)  # attempt 2 holds the lease
    s.ack(0, 2)
    with pytest.raises(AlreadySettled):
        s.ack(0, 1)


def test_ack_after_expiry_is_refused() -> None:
    s = make_state()
    s.grant(0.0, 1, 1, Log([None]))
    s.expire(10.0)
    with pytest.raises(LeaseExpired):
        s.ack(0, 1)
    assert s.floor == 0


def test_ack_after_release_is_refused() -> None:
    s = make_state()
    s.grant(0.0, 1, 1, Log([None]))
    s.release(0, 1)
    with pytest.raises(LeaseExpired):
        s.ack(0, 1)


def test_ack_of_a_never_granted_offset_is_refused() -> None:
    s = make_state()
    s.grant(0.0, 1, 1, Log([None, None]))
    with pytest.raises(LeaseExpired):
        s.ack(1, 1)
    with pytest.raises(LeaseExpired):
        s.ack(7, 1)


def test_double_ack_is_already_settled() -> None:
    s = make_state()
    s.grant(0.0, 3, 1, Log([None] * 3))
    s.ack(0, 1)
    s.ack(2, 1)
    with pytest.raises(AlreadySettled) as info:
        s.ack(0, 1)  # below the floor
    assert (info.value.offset, info.value.attempt) == (0, 1)
    assert "already" in str(info.value)
    with pytest.raises(AlreadySettled):
        s.ack(2, 1)  # above the floor, in the settled set
    assert s.n_acked == 2


def test_ack_many_settles_every_receipt() -> None:
    s = make_state()
    log = Log(["a", "a", None, None])
    s.grant(0.0, 10, 1, log)
    s.ack_many([(3, 1), (0, 1), (2, 1)])
    assert s.floor == 1  # 1 was blocked behind 0 and is not settled
    assert s.n_acked == 3
    assert s.in_flight == 0
    assert s.grant(0.0, 10, 1, log) == [(1, 1, 10.0)]
    s.ack_many([])
    assert s.n_acked == 3


def test_ack_many_stops_at_the_first_stale_receipt() -> None:
    s = make_state()
    log = Log([None] * 4)
    s.grant(0.0, 4, 1, log)
    with pytest.raises(LeaseExpired) as info:
        s.ack_many([(0, 1), (1, 1), (2, 9), (3, 1)])
    assert (info.value.offset, info.value.attempt) == (2, 9)
    assert s.floor == 2  # the receipts before the stale one are settled
    assert s.n_acked == 2
    assert s.in_flight == 2
    s.ack(3, 1)  # the one after it was not touched
    with pytest.raises(AlreadySettled):
        s.ack_many([(2, 1), (0, 1)])
    assert s.floor == 4  # 2 was settled before the double ack of 0 raised


RECEIPT_OPS: dict[str, Callable[[GroupState], object]] = {
    "nack": lambda s: s.nack(0, 1, 0.0, None, None),
    "reject": lambda s: s.reject(0, 1, 0.0, "no"),
    "extend": lambda s: s.extend(0, 1, 0.0, 5.0),
    "release": lambda s: s.release(0, 1),
}


@pytest.mark.parametrize("op", sorted(RECEIPT_OPS))
def test_every_receipt_operation_refuses_a_settled_message(op: str) -> None:
    s = make_state()
    s.grant(0.0, 1, 1, Log([None]))
    s.ack(0, 1)
    with pytest.raises(AlreadySettled):
        RECEIPT_OPS[op](s)
    assert s.n_dead == 0


# -- per-key order ------------------------------------------------------------------------


def test_a_key_never_has_two_messages_in_flight() -> None:
    s = make_state()
    log = Log(["a", "a", "b", None, "a", None, "b"])
    assert offs(s.grant(0.0, 100, 1, log)) == [0, 2, 3, 5]
    assert s.grant(0.0, 100, 2, log) == []
    s.ack(0, 1)
    assert offs(s.grant(0.0, 100, 1, log)) == [1]
    s.ack(2, 1)
    assert offs(s.grant(0.0, 100, 1, log)) == [6]
    s.ack(1, 1)
    assert offs(s.grant(0.0, 100, 1, log)) == [4]


def test_different_keys_and_keyless_messages_flow_in_parallel() -> None:
    s = make_state()
    log = Log(["a", "b", None, None, "c", "d"])
    assert offs(s.grant(0.0, 100, 1, log)) == [0, 1, 2, 3, 4, 5]
    assert s.in_flight == 6


def test_a_blocked_key_does_not_block_other_messages() -> None:
    s = make_state()
    log = Log(["a", "a", "a", None, "b"])
    assert offs(s.grant(0.0, 2, 1, log)) == [0, 3]
    assert offs(s.grant(0.0, 2, 1, log)) == [4]


def test_a_nacked_head_blocks_its_key_through_its_delay() -> None:
    s = make_state()
    log = Log(["a", "a", None])
    assert offs(s.grant(0.0, 10, 1, log)) == [0, 2]
    assert s.nack(0, 1, 1.0, 5.0, "boom") is None
    assert s.grant(2.0, 10, 1, log) == []  # 1 waits behind 0, 0 waits until 6
    assert s.grant(5.99, 10, 1, log) == []
    assert s.grant(6.0, 10, 1, log) == [(0, 2, 16.0)]
    assert s.grant(6.0, 10, 1, log) == []  # still in flight: 1 still blocked
    s.ack(0, 2)
    assert s.grant(6.0, 10, 1, log) == [(1, 1, 16.0)]


def test_an_expired_head_blocks_its_key_until_settled() -> None:
    s = make_state()
    log = Log(["k", "k"])
    s.grant(0.0, 10, 1, log)
    s.expire(10.0)
    assert s.grant(10.5, 10, 1, log) == []  # backoff 1 s, and 1 is blocked
    assert s.grant(11.0, 10, 1, log) == [(0, 2, 21.0)]
    s.ack(0, 2)
    assert offs(s.grant(11.0, 10, 1, log)) == [1]


def test_a_dead_lettered_head_unblocks_its_key() -> None:
    s = make_state(max_deliveries=1)
    log = Log(["k", "k"])
    s.grant(0.0, 10, 1, log)
    action = s.nack(0, 1, 1.0, None, "boom")
    assert action is not None
    assert action.offset == 0
    assert s.grant(1.0, 10, 1, log) == [(1, 1, 11.0)]


def test_a_released_head_comes_back_before_later_messages_of_its_key() -> None:
    s = make_state()
    log = Log(["k", "k", "k"])
    s.grant(0.0, 10, 1, log)
    s.release(0, 1)
    assert s.grant(0.0, 10, 1, log) == [(0, 2, 10.0)]


# -- nack and backoff ---------------------------------------------------------------------


def test_nack_with_an_explicit_delay() -> None:
    s = make_state()
    log = Log([None])
    s.grant(0.0, 1, 1, log)
    assert s.nack(0, 1, 5.0, 3.0, "later") is None
    assert s.in_flight == 0
    assert not s.has_ready(7.99)
    assert s.grant(7.99, 1, 1, log) == []
    assert s.has_ready(8.0)
    assert s.grant(8.0, 1, 1, log) == [(0, 2, 18.0)]


def test_nack_with_zero_delay_is_ready_at_once() -> None:
    s = make_state()
    log = Log([None])
    s.grant(0.0, 1, 1, log)
    s.nack(0, 1, 5.0, 0.0, None)
    assert s.has_ready(5.0)
    assert s.grant(5.0, 1, 1, log) == [(0, 2, 15.0)]


def test_nack_with_a_negative_delay_is_ready_at_once() -> None:
    s = make_state()
    log = Log([None])
    s.grant(0.0, 1, 1, log)
    s.nack(0, 1, 5.0, -30.0, None)
    assert s.grant(5.0, 1, 1, log) == [(0, 2, 15.0)]


def test_nack_without_delay_follows_the_backoff_policy() -> None:
    s = make_state(max_deliveries=None)
    log = Log([None])
    now = 0.0
    expected_waits = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]  # capped at max_s=8
    for attempt, wait in enumerate(expected_waits, start=1):
        assert s.grant(now, 1, 1, log)[0][:2] == (0, attempt)
        now += 0.5
        s.nack(0, attempt, now, None, "boom")
        assert s.grant(now + wait - 0.01, 1, 1, log) == []
        now += wait
    assert s.grant(now, 1, 1, log)[0][:2] == (0, len(expected_waits) + 1)


def test_nack_backoff_jitter_stays_in_bounds() -> None:
    policy = Backoff(initial_s=4.0, multiplier=2.0, max_s=100.0, jitter=0.5)
    for seed in range(20):
        s = make_state(backoff=policy, seed=seed)
        log = Log([None])
        s.grant(0.0, 1, 1, log)
        s.nack(0, 1, 0.0, None, None)
        assert s.grant(1.99, 1, 1, log) == []  # not before 4 * (1 - 0.5)
        nxt = s.next_due()
        assert nxt is not None
        assert 2.0 <= nxt <= 4.0
        assert offs(s.grant(4.0, 1, 1, log)) == [0]


def test_nack_default_error_text() -> None:
    s = make_state(max_deliveries=1)
    s.grant(0.0, 1, 1, Log([None]))
    action = s.nack(0, 1, 0.0, None, None)
    assert action is not None
    assert action.last_error == "nacked by the consumer"


# -- lease expiry and extend ----------------------------------------------------------------


def test_lease_expiry_is_a_failure_and_redelivers_with_the_next_attempt() -> None:
    s = make_state(max_deliveries=2)
    log = Log([None])
    s.grant(0.0, 1, 1, log)
    assert s.expire(9.99) == []
    assert s.in_flight == 1
    assert s.is_leased(0, 1, 9.99)
    assert s.expire(10.0) == []
    assert s.n_expired == 1
    assert s.in_flight == 0
    assert not s.is_leased(0, 1, 10.0)
    assert s.grant(10.99, 1, 1, log) == []  # 1 s backoff
    assert s.grant(11.0, 1, 1, log) == [(0, 2, 21.0)]
    (action,) = s.expire(21.0)  # the second failure spends the budget of 2
    assert action.offset == 0
    assert action.failures == 2
    assert action.attempts == 2
    assert action.first_failure == 10.0
    assert action.last_failure == 21.0
    assert action.last_error == "lease expired after 10 s"
    assert s.n_expired == 2
    assert s.n_dead == 1
    assert s.floor == 1


def test_expire_only_touches_leases_past_their_deadline() -> None:
    s = make_state()
    log = Log([None] * 4)
    s.grant(0.0, 2, 1, log)
    s.grant(5.0, 2, 1, log)
    s.expire(10.0)
    assert s.n_expired == 2
    assert s.in_flight == 2
    assert s.is_leased(2, 1, 10.0)
    assert s.is_leased(3, 1, 10.0)


def test_lease_deadlines_are_kept_as_runs_of_offsets() -> None:
    # held for a whole ack_timeout, one entry per offset would grow the broker by tens of
    # bytes for every message delivered in that time; runs keep it per receive
    s = make_state()
    log = Log([None] * 100_000 + ["k", None, "k"])
    s.grant(0.0, 100_000, 1, log)
    assert list(s._expiries) == [(10.0, [(0, 100_000)])]
    s.grant(1.0, 3, 1, log)  # the second "k" waits behind the first
    assert list(s._expiries)[1] == (11.0, [(100_000, 2)])
    s.ack(5, 1)
    s.expire(10.0)  # every run's offsets still expire, settled ones are skipped
    assert s.n_expired == 100_000 - 1
    assert s.in_flight == 2


def test_expire_ignores_leases_settled_before_their_deadline() -> None:
    s = make_state()
    log = Log([None, None])
    s.grant(0.0, 2, 1, log)
    s.ack(0, 1)
    s.release(1, 1)
    assert s.expire(100.0) == []
    assert s.n_expired == 0


def test_extend_postpones_expiry() -> None:
    s = make_state()
    log = Log([None])
    s.grant(0.0, 1, 1, log)
    assert s.extend(0, 1, 5.0, 20.0) == 25.0
    assert s.expire(10.0) == []
    assert s.n_expired == 0
    assert s.is_leased(0, 1, 24.9)
    assert s.expire(24.9) == []
    assert s.n_expired == 0
    s.expire(25.0)
    assert s.n_expired == 1
    assert not s.is_leased(0, 1, 25.0)


def test_extend_by_default_renews_one_ack_timeout() -> None:
    s = make_state()
    log = Log([None])
    s.grant(0.0, 1, 1, log)
    assert s.extend(0, 1, 8.0, None) == 18.0
    s.expire(17.0)
    s.ack(0, 1)  # still held at 17 s
    assert s.floor == 1
    assert s.n_expired == 0


def test_extend_can_shorten_the_lease() -> None:
    s = make_state()
    s.grant(0.0, 1, 1, Log([None]))
    assert s.extend(0, 1, 1.0, 1.0) == 2.0
    s.expire(2.0)
    assert s.n_expired == 1


def test_extend_of_a_stale_receipt_is_refused() -> None:
    s = make_state()
    log = Log([None])
    s.grant(0.0, 1, 1, log)
    s.expire(10.0)
    with pytest.raises(LeaseExpired):
        s.extend(0, 1, 10.0, 30.0)


# -- release ------------------------------------------------------------------------------


def test_release_does_not_spend_the_failure_budget() -> None:
    s = make_state(max_deliveries=2)
    log = Log([None])
    for attempt in range(1, 6):
        assert s.grant(0.0, 1, 1, log)[0][:2] == (0, attempt)
        s.release(0, attempt)
    assert s.grant(0.0, 1, 1, log)[0][:2] == (0, 6)
    assert s.nack(0, 6, 1.0, 0.0, "first failure") is None  # 1 of 2
    assert s.grant(1.0, 1, 1, log)[0][:2] == (0, 7)
    action = s.nack(0, 7, 2.0, 0.0, "second failure")
    assert action is not None
    assert (action.attempts, action.failures) == (7, 2)
    assert (action.first_failure, action.last_failure) == (1.0, 2.0)


def test_a_released_message_comes_back_first() -> None:
    s = make_state()
    log = Log([None] * 6)
    assert offs(s.grant(0.0, 3, 1, log)) == [0, 1, 2]
    s.release(1, 1)
    assert s.grant(0.0, 1, 1, log) == [(1, 2, 10.0)]
    s.nack(2, 1, 0.0, 0.0, None)  # ready, behind later releases
    s.release(0, 1)
    assert offs(s.grant(0.0, 3, 1, log)) == [0, 2, 3]


def test_release_is_immediate_even_for_delayed_messages() -> None:
    s = make_state()
    log = Log([None])
    s.grant(0.0, 1, 1, log)
    s.nack(0, 1, 0.0, 5.0, None)
    s.grant(5.0, 1, 1, log)
    s.release(0, 2)
    assert s.grant(5.0, 1, 1, log) == [(0, 3, 15.0)]


def test_release_consumer_returns_only_its_leases_without_spending_budget() -> None:
    s = make_state(max_deliveries=1)
    log = Log([None] * 4)
    assert offs(s.grant(0.0, 2, 1, log)) == [0, 1]
    assert offs(s.grant(0.0, 1, 2, log)) == [2]
    assert s.release_consumer(1) == 2
    assert s.release_consumer(1) == 0
    assert s.release_consumer(99) == 0
    assert s.in_flight == 1
    assert s.n_expired == 0
    # the released messages come back first, in offset order, ahead of new message 3
    assert s.grant(1.0, 3, 3, log) == [(0, 2, 11.0), (1, 2, 11.0), (3, 1, 11.0)]
    s.ack(2, 1)  # consumer 2 kept its lease
    action = s.nack(0, 2, 2.0, None, "boom")
    assert action is not None  # max_deliveries=1: the first real failure dead-letters
    assert (action.attempts, action.failures) == (2, 1)


def test_release_consumer_keeps_key_order() -> None:
    s = make_state()
    log = Log(["a", "a", "b"])
    s.grant(0.0, 10, 7, log)
    assert s.release_consumer(7) == 2
    assert offs(s.grant(0.0, 10, 8, log)) == [0, 2]


# -- dead-lettering -----------------------------------------------------------------------


def test_max_deliveries_dead_letters_with_full_provenance() -> None:
    s = make_state(max_deliveries=3)
    log = Log(["k", "k"])
    assert s.grant(0.0, 10, 1, log) == [(0, 1, 10.0)]
    assert s.nack(0, 1, 1.0, None, "boom 1") is None
    assert s.grant(2.0, 10, 1, log) == [(0, 2, 12.0)]
    assert s.expire(12.0) == []  # failure 2: lease expired
    assert s.grant(14.0, 10, 1, log) == [(0, 3, 24.0)]
    action = s.nack(0, 3, 15.0, None, "boom 3")
    assert action == DeadLetterAction(
        offset=0,
        reason="failed 3 of max_deliveries=3 attempts",
        attempts=3,
        failures=3,
        first_failure=1.0,
        last_failure=15.0,
        last_error="boom 3",
    )
    assert s.floor == 1
    assert s.n_dead == 1
    assert s.in_flight == 0
    with pytest.raises(AlreadySettled):
        s.ack(0, 3)
    assert s.grant(100.0, 10, 1, log) == [(1, 1, 110.0)]  # never 0 again


def test_explicit_delay_does_not_escape_the_budget() -> None:
    s = make_state(max_deliveries=1)
    s.grant(0.0, 1, 1, Log([None]))
    action = s.nack(0, 1, 0.0, 60.0, "x")
    assert action is not None
    assert action.failures == 1


def test_unlimited_deliveries_never_dead_letter() -> None:
    s = make_state(max_deliveries=None)
    log = Log([None])
    for attempt in range(1, 60):
        assert s.grant(float(attempt * 100), 1, 1, log)[0][:2] == (0, attempt)
        assert s.nack(0, attempt, float(attempt * 100), 0.0, "boom") is None
    assert s.n_dead == 0
    assert s.floor == 0


def test_reject_dead_letters_at_once() -> None:
    s = make_state(max_deliveries=10)
    log = Log(["k", "k"])
    s.grant(0.0, 10, 1, log)
    action = s.reject(0, 1, 3.0, "bad schema")
    assert action == DeadLetterAction(
        offset=0,
        reason="rejected: bad schema",
        attempts=1,
        failures=1,
        first_failure=3.0,
        last_failure=3.0,
        last_error="bad schema",
    )
    assert s.floor == 1
    assert s.n_dead == 1
    assert s.in_flight == 0
    assert s.grant(3.0, 10, 1, log) == [(1, 1, 13.0)]


def test_reject_keeps_earlier_failures_in_its_provenance() -> None:
    s = make_state(max_deliveries=10)
    log = Log([None])
    s.grant(0.0, 1, 1, log)
    s.nack(0, 1, 2.0, 0.0, "timeout")
    s.grant(2.0, 1, 1, log)
    action = s.reject(0, 2, 4.0, "poison")
    assert (action.attempts, action.failures) == (2, 2)
    assert (action.first_failure, action.last_failure) == (2.0, 4.0)
    assert action.last_error == "poison"


def test_reject_of_a_stale_receipt_is_refused() -> None:
    s = make_state()
    log = Log([None])
    s.grant(0.0, 1, 1, log)
    s.release(0, 1)
    with pytest.raises(LeaseExpired):
        s.reject(0, 1, 0.0, "no")
    assert s.n_dead == 0


# -- SKIP ---------------------------------------------------------------------------------


def test_skip_keys_are_settled_without_delivery() -> None:
    s = make_state()
    log = Log([SKIP, "a", SKIP, None, SKIP])
    assert offs(s.grant(0.0, 10, 1, log)) == [1, 3]
    assert s.floor == 1
    assert s.n_delivered == 2
    s.ack(1, 1)
    assert s.floor == 3
    s.ack(3, 1)
    assert s.floor == 5
    assert s.settled == set()
    assert s.grant(0.0, 10, 1, log) == []


def test_skip_does_not_count_against_the_limit() -> None:
    s = make_state()
    log = Log([SKIP, SKIP, None, SKIP, None, None], sizes=[2, 1])
    assert offs(s.grant(0.0, 2, 1, log)) == [2, 4]


# -- next_due, settle_unleased, stats -----------------------------------------------------


def test_next_due() -> None:
    s = make_state()
    log = Log([None, None])
    assert s.next_due() is None
    s.grant(0.0, 1, 1, log)
    assert s.next_due() == 10.0
    s.nack(0, 1, 1.0, 3.0, None)
    assert s.next_due() == 4.0  # the retry comes before the (stale) lease deadline
    s.grant(4.0, 2, 1, log)
    assert s.next_due() == 10.0
    s.extend(0, 2, 4.0, 1.0)
    assert s.next_due() == 5.0


def test_settle_unleased_returns_false_when_already_settled() -> None:
    s = make_state()
    s.grant(0.0, 2, 1, Log([None, None]))
    s.ack(0, 1)
    s.ack(1, 1)
    assert s.settle_unleased(0) is False
    assert s.settle_unleased(1) is False
    assert s.floor == 2


def test_settle_unleased_refuses_a_leased_message() -> None:
    s = make_state()
    s.grant(0.0, 1, 1, Log([None]))
    with pytest.raises(AlreadySettled):
        s.settle_unleased(0)
    assert s.in_flight == 1
    s.ack(0, 1)


def ack_all(s: GroupState, grants: list[Grant]) -> list[int]:
    for off, attempt, _ in grants:
        s.ack(off, attempt)
    return offs(grants)


def test_settle_unleased_of_a_ready_message() -> None:
    s = make_state()
    log = Log(["k", "k", None, None])
    assert offs(s.grant(0.0, 10, 1, log)) == [0, 2, 3]
    s.release(2, 1)
    assert s.settle_unleased(2) is True
    assert s.grant(0.0, 10, 1, log) == []
    ack_all(s, [(0, 1, 0.0), (3, 1, 0.0)])
    assert ack_all(s, s.grant(0.0, 10, 1, log)) == [1]
    assert s.floor == 4
    assert s.grant(100.0, 10, 1, log) == []


def test_settle_unleased_of_a_delayed_message() -> None:
    s = make_state()
    log = Log([None, None])
    s.grant(0.0, 10, 1, log)
    s.nack(0, 1, 0.0, 5.0, None)
    assert s.settle_unleased(0) is True
    assert s.floor == 1
    assert s.grant(6.0, 10, 1, log) == []
    s.ack(1, 1)
    assert s.floor == 2
    assert s.grant(100.0, 10, 1, log) == []


def test_settle_unleased_of_a_delayed_key_head_unblocks_the_key() -> None:
    s = make_state()
    log = Log(["k", "k", "k"])
    s.grant(0.0, 10, 1, log)
    s.nack(0, 1, 0.0, 5.0, None)
    assert s.settle_unleased(0) is True
    assert s.grant(0.0, 10, 1, log) == [(1, 1, 10.0)]
    assert s.grant(6.0, 10, 1, log) == []  # the stale retry of 0 is not granted
    s.ack(1, 1)
    assert s.grant(6.0, 10, 1, log) == [(2, 1, 16.0)]


def test_settle_unleased_of_a_message_blocked_behind_its_key() -> None:
    s = make_state()
    log = Log(["k", "k", "k"])
    assert offs(s.grant(0.0, 10, 1, log)) == [0]
    assert s.settle_unleased(1) is True
    assert s.in_flight == 1
    s.ack(0, 1)  # the head is still the one held
    assert s.grant(0.0, 10, 1, log) == [(2, 1, 10.0)]
    s.ack(2, 1)
    assert s.floor == 3


def test_settle_unleased_of_unseen_offsets_is_never_granted() -> None:
    # the engine's dead-letter view purges offsets its group never looked at
    s = make_state()
    log = Log(["k", "k", None, None])
    assert s.settle_unleased(3) is True
    assert s.settle_unleased(1) is True
    assert s.floor == 0
    assert s.settle_unleased(0) is True
    assert s.floor == 2  # past the cursor, which is still 0
    assert s.backlog(4) == 1
    assert ack_all(s, s.grant(0.0, 10, 1, log)) == [2]
    assert s.floor == 4
    assert s.grant(100.0, 10, 1, log) == []


def test_settle_unleased_of_a_restored_offset_is_never_granted() -> None:
    s = make_state()
    log = Log([None] * 3)
    s.grant(0.0, 3, 1, log)
    s.nack(1, 1, 0.0, 0.0, "x")
    rec = s.drain()
    assert rec is not None
    r = make_state()
    r.restore([rec], False)
    assert r.settle_unleased(1) is True
    assert offs(r.grant(0.0, 10, 1, log)) == [0, 2]


def test_settle_unleased_is_persisted() -> None:
    s = make_state()
    log = Log([None, None, None])
    s.grant(0.0, 1, 1, log)
    s.settle_unleased(2)
    rec = s.drain()
    assert rec is not None
    r = make_state()
    r.restore([rec], False)
    assert r.grant(0.0, 10, 1, log) == [(0, 2, 10.0), (1, 1, 10.0)]


def test_stats_counters() -> None:
    s = make_state(max_deliveries=2)
    log = Log([None] * 5)
    s.grant(0.0, 5, 1, log)  # 5 delivered
    s.ack(0, 1)
    s.nack(1, 1, 0.0, 0.0, None)
    s.release(2, 1)
    s.reject(3, 1, 0.0, "bad")
    s.grant(0.0, 5, 1, log)  # 1 and 2 again
    s.expire(10.0)  # 1 (failure 2: dead), 2 (failure 1) and 4 (failure 1) expire
    s.grant(11.0, 5, 1, log)  # 2 and 4 again
    assert s.n_delivered == 9
    assert s.n_redelivered == 4
    assert s.n_acked == 1
    assert s.n_nacked == 1
    assert s.n_expired == 3
    assert s.n_dead == 2
    assert s.in_flight == 2
    assert "orders/billing" in repr(s)
    assert "in_flight=2" in repr(s)


# -- persistence: drain, snapshot, restore --------------------------------------------------

SCENARIO_KEYS: list[Key] = ["a", "a", "b", None, None, "c", None, "a", None]


def scenario(persist: str) -> tuple[GroupState, Log, list[bytes], bool]:
    """Run a mix of operations; return the state and what a store would hold.

    ``persist``: "deltas" (one delta at the end), "many" (a delta after every step),
    "snapshot" (a snapshot at the end), "snapshot+deltas" (a snapshot midway, then deltas).
    """
    s = make_state(max_deliveries=3)
    log = Log(SCENARIO_KEYS[:6], sizes=[2, 3])
    records: list[bytes] = []
    first_is_snapshot = False

    def step() -> None:
        if persist == "many":
            d = s.drain()
            if d is not None:
                records.append(d)

    assert offs(s.grant(0.0, 100, 1, log)) == [0, 2, 3, 4, 5]
    step()
    s.ack(3, 1)
    s.ack(5, 1)
    step()
    s.nack(2, 1, 1.0, 100.0, "not yet")  # delayed until 101
    step()
    s.nack(0, 1, 1.0, 0.0, "flaky")  # failure 1 of 3
    step()
    assert s.grant(1.0, 1, 2, log) == [(0, 2, 11.0)]
    step()
    if persist == "snapshot+deltas":
        s.drain()
        records = [s.snapshot()]
        first_is_snapshot = True
    log.append(SCENARIO_KEYS[6:])
    assert offs(s.grant(1.0, 100, 2, log)) == [6, 8]  # 7 ("a") waits behind 0
    step()
    s.release(4, 1)  # not a failure
    s.reject(6, 1, 2.0, "poison")
    step()
    s.ack(8, 1)
    step()
    if persist == "snapshot":
        s.drain()
        records = [s.snapshot()]
        first_is_snapshot = True
    else:
        d = s.drain()
        if d is not None:
            records.append(d)
    assert s.drain() is None
    return s, log, records, first_is_snapshot


PERSIST_MODES = ["deltas", "many", "snapshot", "snapshot+deltas"]


@pytest.mark.parametrize("persist", PERSIST_MODES)
def test_restore_regrants_exactly_the_unsettled_messages(persist: str) -> None:
    old, log, records, first_is_snapshot = scenario(persist)
    s = make_state(max_deliveries=3)
    s.restore(records, first_is_snapshot)
    assert s.floor == old.floor == 0
    assert s.settled == old.settled == {3, 5, 6, 8}
    assert s.in_flight == 0
    # 0: held at the crash (attempt 2) -> attempt 3; 4: released -> attempt 2
    # 1, 7: behind 0 (key "a"); 2: delayed until 101; 3, 5, 6, 8: settled
    assert s.grant(5.0, 100, 1, log) == [(0, 3, 15.0), (4, 2, 15.0)]
    assert s.grant(100.99, 100, 1, log) == []
    assert s.grant(101.0, 100, 1, log) == [(2, 2, 111.0)]
    s.ack(4, 2)
    s.ack(2, 2)
    s.ack(0, 3)
    assert s.grant(101.0, 100, 1, log) == [(1, 1, 111.0)]
    s.ack(1, 1)
    assert s.grant(101.0, 100, 1, log) == [(7, 1, 111.0)]
    s.ack(7, 1)
    assert s.floor == len(log)
    assert s.grant(500.0, 100, 1, log) == []


@pytest.mark.parametrize("persist", PERSIST_MODES)
def test_restore_preserves_the_failure_budget_and_provenance(persist: str) -> None:
    _, log, records, first_is_snapshot = scenario(persist)
    s = make_state(max_deliveries=3)
    s.restore(records, first_is_snapshot)
    assert s.grant(5.0, 1, 1, log) == [(0, 3, 15.0)]
    assert s.nack(0, 3, 6.0, 0.0, "flaky again") is None  # failure 2 of 3
    assert s.grant(6.0, 1, 1, log)[0][:2] == (0, 4)
    action = s.nack(0, 4, 7.0, 0.0, "gave up")
    assert action == DeadLetterAction(
        offset=0,
        reason="failed 3 of max_deliveries=3 attempts",
        attempts=4,
        failures=3,
        first_failure=1.0,  # from before the restart
        last_failure=7.0,
        last_error="gave up",
    )


@pytest.mark.parametrize("persist", PERSIST_MODES)
def test_restore_then_snapshot_then_restore_again(persist: str) -> None:
    _, log, records, first_is_snapshot = scenario(persist)
    mid = make_state(max_deliveries=3)
    mid.restore(records, first_is_snapshot)
    # nothing granted yet: the recovered history must survive a second snapshot
    again = make_state(max_deliveries=3)
    again.restore([mid.snapshot()], True)
    assert again.grant(5.0, 100, 1, log) == [(0, 3, 15.0), (4, 2, 15.0)]
    assert again.grant(101.0, 100, 1, log) == [(2, 2, 111.0)]


def test_a_restored_retry_behind_its_key_keeps_its_delay_once_unblocked() -> None:
    # history recorded on a log read without keys, restored onto the keyed log
    before = make_state()
    before.grant(0.0, 2, 1, Log([None, None]))
    before.nack(1, 1, 0.0, 50.0, "later")
    rec = before.drain()
    assert rec is not None
    s = make_state()
    s.restore([rec], False)
    log = Log(["k", "k"])
    assert s.grant(1.0, 10, 1, log) == [(0, 2, 11.0)]  # 1 waits behind 0
    s.ack(0, 2)
    assert s.grant(1.0, 10, 1, log) == []  # unblocked, but its retry is due at 50
    assert s.grant(50.0, 10, 1, log) == [(1, 2, 60.0)]


def test_attempts_continue_across_several_restarts() -> None:
    log = Log(["k", None])
    records: list[bytes] = []
    expected = 1
    for restart in range(4):
        s = make_state(max_deliveries=None)
        s.restore(records, False)
        g = s.grant(float(restart), 1, 1, log)
        assert g == [(0, expected, restart + 10.0)]
        d = s.drain()
        assert d is not None
        records.append(d)
        expected += 1
    s = make_state(max_deliveries=None)
    s.restore(records, False)
    assert s.grant(9.0, 10, 1, log) == [(0, 5, 19.0), (1, 1, 19.0)]


def test_restore_of_nothing_starts_fresh() -> None:
    s = make_state()
    s.restore([], False)
    assert (s.floor, s.cursor) == (0, 0)
    assert offs(s.grant(0.0, 10, 1, Log([None, "a"]))) == [0, 1]


def test_a_crash_loses_nothing_that_was_drained_and_forgets_leases() -> None:
    s = make_state()
    log = Log([None] * 4)
    s.grant(0.0, 4, 1, log)
    s.ack(1, 1)
    d1 = s.drain()
    s.ack(2, 1)  # not drained before the crash: redelivered (at-least-once)
    assert d1 is not None
    r = make_state()
    r.restore([d1], False)
    assert r.grant(0.0, 10, 1, log) == [(0, 2, 10.0), (2, 2, 10.0), (3, 2, 10.0)]


def test_drain_is_none_when_nothing_changed() -> None:
    s = make_state()
    assert not s.dirty
    assert s.drain() is None
    s.grant(0.0, 1, 1, Log([None]))
    assert s.dirty
    assert isinstance(s.drain(), bytes)
    assert not s.dirty
    assert s.drain() is None
    s.extend(0, 1, 0.0, 5.0)  # a lease change is not persistent state
    assert s.drain() is None


def test_snapshot_of_a_fresh_state_restores_to_the_same_start() -> None:
    s = make_state(start=7)
    r = make_state()
    r.restore([s.snapshot()], True)
    assert r.floor == 7
    assert offs(r.grant(0.0, 10, 1, Log([None] * 9))) == [7, 8]


@pytest.mark.parametrize(
    ("records", "first_is_snapshot"),
    [
        ([b"garbage"], False),
        ([b"garbage"], True),
        ([b""], False),
        ([b"\xc1\xc1\xc1"], True),
        ([b"\x93\x01\x02\x03"], False),  # valid msgpack, wrong shape
    ],
)
def test_restore_of_garbage_raises_storage_error(
    records: list[bytes], first_is_snapshot: bool
) -> None:
    s = make_state()
    with pytest.raises(StorageError) as info:
        s.restore(records, first_is_snapshot)
    assert "'billing'" in str(info.value)
    assert "'orders'" in str(info.value)
    assert "damaged" in str(info.value)


def test_restore_of_a_delta_read_as_a_snapshot_raises_storage_error() -> None:
    s = make_state()
    s.grant(0.0, 1, 1, Log([None]))
    delta = s.drain()
    assert delta is not None
    with pytest.raises(StorageError):
        make_state().restore([delta], True)


def test_restore_of_garbage_after_a_good_record_raises_storage_error() -> None:
    s = make_state()
    with pytest.raises(StorageError):
        s.restore([s.snapshot(), b"\xff\xff"], True)


# -- property: random operations keep the invariants ----------------------------------------

JITTERY = Backoff(initial_s=1.0, multiplier=2.0, max_s=8.0, jitter=0.5)


class GroupMachine(RuleBasedStateMachine):
    """Random grant/ack/nack/reject/release/extend/expire/crash runs against a model.

    The model knows what was granted, held, failed and settled; after every step the
    module's invariants are checked against it. ``crash`` persists every change (as a
    committed store would), then rebuilds the state from the deltas and/or a snapshot.
    """

    MAX_DELIVERIES: int | None = 3

    def __init__(self) -> None:
        super().__init__()
        self.log = Log()
        self.now = 0.0
        self.rng_seed = 0
        self.state = self._new_state()
        self.records: list[bytes] = []
        self.first_is_snapshot = False
        self.held: dict[int, tuple[int, float, int]] = {}  # off -> (attempt, deadline, consumer)
        self.deliveries: dict[int, int] = {}
        self.failures: dict[int, int] = {}
        self.earliest: dict[int, float] = {}  # a retried offset is not due before this
        self.settled: set[int] = set()
        self.last_first: dict[str, int] = {}  # key -> last offset delivered for the first time

    def _new_state(self) -> GroupState:
        self.rng_seed += 1
        return make_state(max_deliveries=self.MAX_DELIVERIES, backoff=JITTERY, seed=self.rng_seed)

    # -- model bookkeeping --

    def _failed(self, off: int, explicit_delay: float | None) -> bool:
        """Count a failure of ``off``; True if it must be dead-lettered now."""
        self.failures[off] = n = self.failures.get(off, 0) + 1
        if self.MAX_DELIVERIES is not None and n >= self.MAX_DELIVERIES:
            return True
        if explicit_delay is not None:
            self.earliest[off] = self.now + max(0.0, explicit_delay)
        else:
            base = min(JITTERY.max_s, JITTERY.initial_s * JITTERY.multiplier ** (n - 1))
            self.earliest[off] = self.now + base * (1 - JITTERY.jitter)
        return False

    def _check_dead(self, action: DeadLetterAction, off: int) -> None:
        assert action.offset == off
        assert action.attempts == self.deliveries[off]
        assert action.failures == self.failures[off]
        self.settled.add(off)

    def _expire(self) -> None:
        actions = {a.offset: a for a in self.state.expire(self.now)}
        due = sorted(off for off, (_, deadline, _) in self.held.items() if deadline <= self.now)
        dead = set()
        for off in due:
            del self.held[off]
            if self._failed(off, None):
                dead.add(off)
        assert set(actions) == dead
        for off in dead:
            self._check_dead(actions[off], off)

    def _pick(self, i: int) -> tuple[int, int]:
        off = sorted(self.held)[i % len(self.held)]
        return off, self.held[off][0]

    # -- rules --

    @rule(
        keys=st.lists(st.sampled_from(["a", "b", "c", None, None, SKIP]), min_size=1, max_size=5),
        sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    )
    def append(self, keys: list[Key], sizes: list[int]) -> None:
        self.log.append(keys, sizes)

    @rule(dt=st.sampled_from([0.25, 1.0, 2.0, 5.0, 9.75, 10.0, 30.0]))
    def advance(self, dt: float) -> None:
        self.now += dt
        self._expire()

    @rule(limit=st.integers(1, 6), consumer=st.integers(1, 3))
    def grant(self, limit: int, consumer: int) -> None:
        self._expire()
        grants = self.state.grant(self.now, limit, consumer, self.log)
        assert len(grants) <= limit
        for off, attempt, deadline in grants:
            key = self.log.keys[off]
            assert key is not SKIP
            assert off not in self.settled, f"settled offset {off} granted again"
            assert off not in self.held, f"offset {off} granted twice at once"
            assert attempt == self.deliveries.get(off, 0) + 1
            assert deadline == self.now + ACK_TIMEOUT
            assert self.now >= self.earliest.get(off, 0.0) - 1e-9, "granted before its delay"
            if isinstance(key, str):
                earlier = [o for o in range(off) if self.log.keys[o] == key]
                assert all(o in self.settled for o in earlier), "key order broken"
                if attempt == 1:  # first deliveries of a key come in offset order
                    assert off > self.last_first.get(key, -1)
                    self.last_first[key] = off
            self.deliveries[off] = attempt
            self.held[off] = (attempt, deadline, consumer)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 1000))
    def ack(self, i: int) -> None:
        off, attempt = self._pick(i)
        self.state.ack(off, attempt)
        del self.held[off]
        self.settled.add(off)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 1000), delay=st.sampled_from([None, None, 0.0, 3.0, -1.0]))
    def nack(self, i: int, delay: float | None) -> None:
        off, attempt = self._pick(i)
        action = self.state.nack(off, attempt, self.now, delay, "boom")
        del self.held[off]
        if self._failed(off, delay):
            assert action is not None
            self._check_dead(action, off)
            assert action.last_error == "boom"
        else:
            assert action is None

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 1000))
    def reject(self, i: int) -> None:
        off, attempt = self._pick(i)
        action = self.state.reject(off, attempt, self.now, "poison")
        del self.held[off]
        self.failures[off] = self.failures.get(off, 0) + 1
        self._check_dead(action, off)
        assert action.reason == "rejected: poison"

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 1000))
    def release(self, i: int) -> None:
        off, attempt = self._pick(i)
        self.state.release(off, attempt)
        del self.held[off]

    @rule(consumer=st.integers(1, 3))
    def release_consumer(self, consumer: int) -> None:
        mine = [off for off, (_, _, c) in self.held.items() if c == consumer]
        assert self.state.release_consumer(consumer) == len(mine)
        for off in mine:
            del self.held[off]

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 1000), seconds=st.sampled_from([None, 0.5, 30.0]))
    def extend(self, i: int, seconds: float | None) -> None:
        off, attempt = self._pick(i)
        deadline = self.state.extend(off, attempt, self.now, seconds)
        assert deadline == self.now + (ACK_TIMEOUT if seconds is None else seconds)
        self.held[off] = (attempt, deadline, self.held[off][2])

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 1000), wrong=st.sampled_from([-1, 1]))
    def stale_receipt(self, i: int, wrong: int) -> None:
        off, attempt = self._pick(i)
        in_flight = self.state.in_flight
        with pytest.raises(LeaseExpired):
            self.state.ack(off, attempt + wrong)
        assert self.state.in_flight == in_flight

    @precondition(lambda self: self.settled)
    @rule(i=st.integers(0, 1000))
    def double_settle(self, i: int) -> None:
        done = sorted(self.settled)
        off = done[i % len(done)]
        with pytest.raises(AlreadySettled):
            self.state.ack(off, self.deliveries.get(off, 1))
        assert self.state.settle_unleased(off) is False

    @rule(i=st.integers(0, 1000))
    def settle_unleased(self, i: int) -> None:
        """A dead letter purged or replayed: settle a message wherever it waits."""
        free = [
            off
            for off, key in enumerate(self.log.keys)
            if key is not SKIP and off not in self.settled and off not in self.held
        ]
        if not free:
            return
        off = free[i % len(free)]
        assert self.state.settle_unleased(off) is True
        self.settled.add(off)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 1000))
    def settle_unleased_refuses_a_lease(self, i: int) -> None:
        off, _ = self._pick(i)
        with pytest.raises(AlreadySettled):
            self.state.settle_unleased(off)
        assert self.state.in_flight == len(self.held)

    @rule()
    def persist(self) -> None:
        d = self.state.drain()
        if d is not None:
            self.records.append(d)
        assert self.state.drain() is None

    @rule()
    def compact(self) -> None:
        self.state.drain()
        self.records = [self.state.snapshot()]
        self.first_is_snapshot = True

    @rule(compact=st.booleans())
    def crash(self, compact: bool) -> None:
        """Persist everything, drop the state with its leases, restore it from the store."""
        self.persist()
        if compact:
            self.compact()
        old = self.state
        self.state = self._new_state()
        self.state.restore(self.records, self.first_is_snapshot)
        assert self.state.floor == old.floor
        assert self.state.settled == old.settled
        self.held.clear()  # no lease survives; releasing is not a failure

    @rule()
    def drain_everything(self) -> None:
        """Liveness: acking whatever comes settles the whole log."""
        for off, (attempt, _, _) in sorted(self.held.items()):
            self.state.ack(off, attempt)
            self.settled.add(off)
        self.held.clear()
        for _ in range(len(self.log) + 2):
            self.now += JITTERY.max_s
            self.grant(1000, 1)
            for off, (attempt, _, _) in sorted(self.held.items()):
                self.state.ack(off, attempt)
                self.settled.add(off)
            self.held.clear()
        assert self.state.floor == len(self.log)
        assert self.state.in_flight == 0
        assert self.state.grant(self.now + 1000, 1000, 1, self.log) == []

    # -- invariants --

    @invariant()
    def leases_match_the_model(self) -> None:
        assert self.state.in_flight == len(self.held)
        for off, (attempt, _, _) in self.held.items():
            assert self.state.is_leased(off, attempt, self.now)

    @invariant()
    def no_key_has_two_messages_in_flight(self) -> None:
        keys = [self.log.keys[off] for off in self.held]
        named = [k for k in keys if k is not None]
        assert len(named) == len(set(named))

    @invariant()
    def floor_never_passes_an_unsettled_offset(self) -> None:
        s = self.state
        assert s.floor <= len(self.log)
        for off in range(s.floor):
            assert off in self.settled or self.log.keys[off] is SKIP, off
        assert {o for o in self.settled if o >= s.floor} <= s.settled
        assert all(o >= s.floor for o in s.settled)

    @invariant()
    def every_granted_offset_is_settled_in_flight_or_waiting(self) -> None:
        s = self.state
        for off in self.deliveries:
            if off in self.settled:
                assert off < s.floor or off in s.settled
                assert off not in s.entries
            elif off in self.held:
                assert off in s.entries
            else:
                waiting = off in s.entries and not s.entries[off].leased
                assert waiting or off >= s.cursor, f"offset {off} is lost"

    @invariant()
    def budgets_match_the_model(self) -> None:
        # releases never count; nacks, expiries and rejects do
        for off, e in self.state.entries.items():
            assert e.deliveries == self.deliveries.get(off, 0), off
            assert e.failures == self.failures.get(off, 0), off


class UnlimitedGroupMachine(GroupMachine):
    MAX_DELIVERIES = None


_machine_settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGroupStateInvariants = GroupMachine.TestCase
TestGroupStateInvariants.settings = _machine_settings
TestGroupStateInvariantsUnlimited = UnlimitedGroupMachine.TestCase
TestGroupStateInvariantsUnlimited.settings = _machine_settings


def test_a_stuck_key_stops_the_read_ahead_at_max_tracked() -> None:
    """Memory stays bounded: blocked messages count, and reading ahead resumes on settle."""
    s = GroupState(
        "q",
        "g",
        0,
        ack_timeout=30.0,
        max_deliveries=None,
        backoff=Backoff(),
        rng=random.Random(0),
        max_tracked=4,
    )
    log = Log(["hot"] * 6 + [None] * 3)
    first = s.grant(0.0, 100, 1, log)
    assert [g[0] for g in first] == [0]  # 0 leased; 1-3 blocked behind it; then the cap
    assert len(s.entries) == 4
    assert s.cursor == 4
    assert s.grant(0.0, 100, 1, log) == []  # still stuck: nothing more is read ahead
    s.ack(0, 1)
    assert [g[0] for g in s.grant(0.0, 100, 1, log)] == [1]  # 1 leased, 4 blocked: cap again
    assert len(s.entries) == 4
    for off in range(1, 6):
        s.ack(off, 1)
        s.grant(0.0, 100, 1, log)
    assert s.floor >= 6
    rest = s.grant(0.0, 100, 1, log)
    assert s.in_flight <= 4
    assert all(g[0] >= 6 for g in rest)
