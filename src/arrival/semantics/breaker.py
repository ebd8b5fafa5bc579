"""The circuit breaker of a handler, as a pure state machine: time is passed in.

A handler whose calls keep failing (a database down, a payment provider timing out) should
stop taking messages rather than burn every message's attempts and fill the dead-letter
queue. After ``failure_threshold`` consecutive failures the breaker *opens*: the handler
takes no messages, and those it holds but has not started go back without spending an
attempt. After ``recovery_timeout`` seconds it is *half-open*: one trial message at a time.
A success closes it; a failure opens it again for another ``recovery_timeout``.

Every transition is in ``_TRANSITIONS``; an event with no entry leaves the state as it is.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from arrival.errors import UsageError

__all__ = ["Breaker", "BreakerState", "CircuitBreaker"]


class BreakerState(enum.StrEnum):
    CLOSED = "closed"  # messages flow
    OPEN = "open"  # no messages until recovery_timeout has passed
    HALF_OPEN = "half-open"  # one trial message at a time


class _Event(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"  # a failure that reached failure_threshold, or any in half-open
    RECOVERY_DUE = "recovery due"


_TRANSITIONS: dict[tuple[BreakerState, _Event], BreakerState] = {
    (BreakerState.CLOSED, _Event.FAILURE): BreakerState.OPEN,
    (BreakerState.OPEN, _Event.RECOVERY_DUE): BreakerState.HALF_OPEN,
    (BreakerState.HALF_OPEN, _Event.SUCCESS): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, _Event.FAILURE): BreakerState.OPEN,
    # a message taken before the breaker opened may still finish: its outcome counts
    (BreakerState.OPEN, _Event.SUCCESS): BreakerState.OPEN,
    (BreakerState.OPEN, _Event.FAILURE): BreakerState.OPEN,
}


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """A handler's circuit breaker settings (``@app.handler(..., breaker=...)``)."""

    failure_threshold: int = 5
    recovery_timeout: float = 30.0  # seconds open before a trial message

    def __post_init__(self) -> None:
        if isinstance(self.failure_threshold, bool) or not isinstance(self.failure_threshold, int):
            raise UsageError(f"failure_threshold must be an int, not {self.failure_threshold!r}")
        if self.failure_threshold < 1:
            raise UsageError(f"failure_threshold must be at least 1, not {self.failure_threshold}")
        t = self.recovery_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise UsageError(f"recovery_timeout must be a finite number of seconds > 0, not {t!r}")


class Breaker:
    """The state of one handler's breaker. ``now`` is any monotonic clock, in seconds."""

    __slots__ = ("_trials", "config", "consecutive_failures", "opened", "opened_at", "state")

    def __init__(self, config: CircuitBreaker) -> None:
        self.config = config
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened = 0  # times it opened
        self.opened_at = 0.0
        self._trials = 0  # trial messages in progress (half-open)

    def __repr__(self) -> str:
        return (
            f"<Breaker {self.state} failures={self.consecutive_failures}/"
            f"{self.config.failure_threshold} opened={self.opened}>"
        )

    def _apply(self, event: _Event, now: float) -> None:
        new = _TRANSITIONS.get((self.state, event), self.state)
        if new is BreakerState.OPEN and self.state is not BreakerState.OPEN:
            self.opened += 1
            self.opened_at = now
            self._trials = 0
        elif new is BreakerState.CLOSED:
            self.consecutive_failures = 0
            self._trials = 0
        self.state = new

    def current(self, now: float) -> BreakerState:
        """The state at ``now``: an open breaker whose recovery time came is half-open."""
        if self.state is BreakerState.OPEN and now >= self.opened_at + self.config.recovery_timeout:
            self._apply(_Event.RECOVERY_DUE, now)
        return self.state

    def allowed(self, now: float) -> int | None:
        """How many more messages may start now: None for no limit (closed), 0 while
        open or while the half-open trial is running, 1 for the trial."""
        state = self.current(now)
        if state is BreakerState.CLOSED:
            return None
        if state is BreakerState.HALF_OPEN and self._trials == 0:
            return 1
        return 0

    def started(self, now: float) -> None:
        """A message was handed to the handler (it counts as the trial when half-open)."""
        if self.current(now) is BreakerState.HALF_OPEN:
            self._trials += 1

    def succeeded(self, now: float) -> None:
        self.consecutive_failures = 0
        if self.state is BreakerState.HALF_OPEN:
            self._apply(_Event.SUCCESS, now)

    def failed(self, now: float) -> None:
        self.consecutive_failures += 1
        if (
            self.state is BreakerState.HALF_OPEN
            or self.consecutive_failures >= self.config.failure_threshold
        ):
            self._apply(_Event.FAILURE, now)

    def remaining(self, now: float) -> float:
        """Seconds until an open breaker half-opens (0 when it is not open)."""
        if self.current(now) is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.config.recovery_timeout - now)
