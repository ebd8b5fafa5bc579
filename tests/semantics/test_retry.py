"""Unit tests of arrival.semantics.retry: backoff delays and the retry/dead-letter decision."""

from __future__ import annotations

import math
import random

import pytest

from arrival.model import Backoff
from arrival.semantics.retry import DeadLetter, Retry, backoff_delay, decide_retry

NO_JITTER = Backoff(initial_s=1.0, multiplier=2.0, max_s=300.0, jitter=0.0)


class FixedRandom(random.Random):
    """A Random whose ``random()`` always returns ``value``: pins the jitter draw."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_grows_exponentially_from_initial() -> None:
    rng = random.Random(0)
    delays = [backoff_delay(n, NO_JITTER, rng) for n in range(1, 7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def test_backoff_uses_initial_and_multiplier() -> None:
    policy = Backoff(initial_s=0.25, multiplier=3.0, max_s=1000.0, jitter=0.0)
    rng = random.Random(0)
    assert [backoff_delay(n, policy, rng) for n in (1, 2, 3)] == [0.25, 0.75, 2.25]


def test_backoff_is_capped_at_max_s() -> None:
    policy = Backoff(initial_s=1.0, multiplier=2.0, max_s=10.0, jitter=0.0)
    rng = random.Random(0)
    assert backoff_delay(4, policy, rng) == 8.0
    assert backoff_delay(5, policy, rng) == 10.0  # 16 capped
    assert backoff_delay(40, policy, rng) == 10.0


@pytest.mark.parametrize("failures", [0, -1, -1000])
def test_no_failure_means_no_delay(failures: int) -> None:
    assert backoff_delay(failures, NO_JITTER, random.Random(0)) == 0.0


def test_jitter_bounds_are_reached_exactly() -> None:
    policy = Backoff(initial_s=4.0, multiplier=2.0, max_s=300.0, jitter=0.5)
    # failure 2 -> base 8 s; jitter scales it by (1 - 0.5 * r) for r in [0, 1)
    assert backoff_delay(2, policy, FixedRandom(0.0)) == 8.0
    assert backoff_delay(2, policy, FixedRandom(0.5)) == 6.0
    assert backoff_delay(2, policy, FixedRandom(0.999999)) == pytest.approx(4.000004)


@pytest.mark.parametrize("jitter", [0.1, 0.5, 1.0])
def test_jitter_keeps_delay_within_bounds_and_spreads_it(jitter: float) -> None:
    policy = Backoff(initial_s=1.0, multiplier=2.0, max_s=20.0, jitter=jitter)
    rng = random.Random(1234)
    for failures in range(1, 12):
        base = min(20.0, 2.0 ** (failures - 1))
        samples = [backoff_delay(failures, policy, rng) for _ in range(200)]
        assert all(base * (1 - jitter) <= d <= base for d in samples)
        # jitter really spreads retries: most of the range is used
        assert max(samples) - min(samples) > 0.8 * base * jitter


def test_jitter_is_reproducible_from_the_seed() -> None:
    policy = Backoff(jitter=0.5)
    a = [backoff_delay(n, policy, random.Random(7)) for n in range(1, 10)]
    b = [backoff_delay(n, policy, random.Random(7)) for n in range(1, 10)]
    c = [backoff_delay(n, policy, random.Random(8)) for n in range(1, 10)]
    assert a == b
    assert a != c


@pytest.mark.parametrize("failures", [1025, 5000, 10**9, 10**30])
@pytest.mark.parametrize("multiplier", [1.5, 2.0, 10.0, 1e6])
def test_huge_failure_counts_do_not_overflow(failures: int, multiplier: float) -> None:
    policy = Backoff(initial_s=1.0, multiplier=multiplier, max_s=300.0, jitter=0.0)
    assert backoff_delay(failures, policy, random.Random(0)) == 300.0


def test_huge_failure_counts_with_multiplier_one_stay_at_initial() -> None:
    policy = Backoff(initial_s=2.0, multiplier=1.0, max_s=300.0, jitter=0.0)
    assert backoff_delay(10**12, policy, random.Random(0)) == 2.0


def test_product_overflow_to_infinity_is_capped() -> None:
    # multiplier**exponent is finite but initial_s * it overflows to inf: still capped
    policy = Backoff(initial_s=1e300, multiplier=10.0, max_s=1e308, jitter=0.0)
    delay = backoff_delay(50, policy, random.Random(0))
    assert delay == 1e308
    assert math.isfinite(delay)


@pytest.mark.parametrize("failures", [1, 3, 1025, 2000, 10**9])
@pytest.mark.parametrize("max_s", [0.0, 300.0])
def test_zero_initial_delay_stays_zero_for_any_failure_count(failures: int, max_s: float) -> None:
    # Backoff docstring: failure n waits min(max_s, initial_s * multiplier**(n-1)) == 0 here,
    # also once multiplier**(n-1) would overflow a float
    policy = Backoff(initial_s=0.0, multiplier=2.0, max_s=max_s, jitter=0.5)
    assert backoff_delay(failures, policy, random.Random(0)) == 0.0


def test_decide_retry_dead_letters_at_max_deliveries() -> None:
    decision = decide_retry(3, 3, NO_JITTER, random.Random(0))
    assert isinstance(decision, DeadLetter)
    assert "3" in decision.reason
    assert "max_deliveries=3" in decision.reason


def test_decide_retry_dead_letters_past_max_deliveries() -> None:
    assert isinstance(decide_retry(7, 3, NO_JITTER, random.Random(0)), DeadLetter)


def test_decide_retry_retries_below_max_deliveries_with_backoff() -> None:
    assert decide_retry(1, 3, NO_JITTER, random.Random(0)) == Retry(1.0)
    assert decide_retry(2, 3, NO_JITTER, random.Random(0)) == Retry(2.0)


def test_decide_retry_uses_the_given_rng_for_jitter() -> None:
    policy = Backoff(initial_s=1.0, multiplier=2.0, max_s=300.0, jitter=0.5)
    decision = decide_retry(4, 10, policy, random.Random(99))
    assert decision == Retry(backoff_delay(4, policy, random.Random(99)))
    assert isinstance(decision, Retry)
    assert 4.0 <= decision.delay_s <= 8.0


def test_requested_delay_overrides_the_policy() -> None:
    assert decide_retry(5, 10, NO_JITTER, random.Random(0), requested_delay_s=7.5) == Retry(7.5)
    assert decide_retry(1, 10, NO_JITTER, random.Random(0), requested_delay_s=0.0) == Retry(0.0)


def test_negative_requested_delay_is_clamped_to_zero() -> None:
    assert decide_retry(1, 10, NO_JITTER, random.Random(0), requested_delay_s=-3.0) == Retry(0.0)


def test_requested_delay_does_not_extend_the_budget() -> None:
    decision = decide_retry(3, 3, NO_JITTER, random.Random(0), requested_delay_s=1.0)
    assert isinstance(decision, DeadLetter)


@pytest.mark.parametrize("failures", [1, 10, 10_000, 10**9])
def test_unlimited_deliveries_never_dead_letter(failures: int) -> None:
    policy = Backoff(initial_s=1.0, multiplier=2.0, max_s=60.0, jitter=0.0)
    decision = decide_retry(failures, None, policy, random.Random(0))
    assert decision == Retry(min(60.0, 2.0 ** min(failures - 1, 100)))
