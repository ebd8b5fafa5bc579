"""The circuit breaker's state machine, with time passed in."""

from __future__ import annotations

import pytest

from arrival.errors import UsageError
from arrival.semantics.breaker import Breaker, BreakerState, CircuitBreaker


def test_it_opens_after_threshold_consecutive_failures_only() -> None:
    b = Breaker(CircuitBreaker(failure_threshold=3, recovery_timeout=10))
    b.failed(0)
    b.failed(0)
    b.succeeded(0)  # resets the count
    b.failed(0)
    b.failed(0)
    assert b.current(0) is BreakerState.CLOSED
    assert b.allowed(0) is None
    b.failed(1)
    assert b.current(1) is BreakerState.OPEN
    assert b.opened == 1
    assert b.allowed(1) == 0
    assert b.remaining(4) == pytest.approx(7)


def test_half_open_allows_one_trial_that_closes_or_reopens_it() -> None:
    b = Breaker(CircuitBreaker(failure_threshold=1, recovery_timeout=10))
    b.failed(0)
    assert b.current(9.99) is BreakerState.OPEN
    assert b.allowed(10) == 1
    assert b.current(10) is BreakerState.HALF_OPEN
    b.started(10)
    assert b.allowed(10) == 0  # one trial at a time
    b.failed(11)
    assert b.current(11) is BreakerState.OPEN
    assert b.opened == 2
    assert b.current(20.9) is BreakerState.OPEN  # a new recovery_timeout from 11
    assert b.allowed(21) == 1
    b.started(21)
    b.succeeded(22)
    assert b.current(22) is BreakerState.CLOSED
    assert b.consecutive_failures == 0
    assert b.allowed(22) is None
    assert b.remaining(22) == 0


def test_outcomes_of_messages_started_before_it_opened_keep_it_open() -> None:
    b = Breaker(CircuitBreaker(failure_threshold=1, recovery_timeout=10))
    b.failed(0)
    b.succeeded(1)  # a message taken before it opened finished late
    b.failed(2)
    assert b.current(2) is BreakerState.OPEN
    assert b.opened == 1
    assert b.opened_at == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"failure_threshold": True}, "failure_threshold"),
        ({"recovery_timeout": 0}, "recovery_timeout"),
        ({"recovery_timeout": float("inf")}, "recovery_timeout"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]
