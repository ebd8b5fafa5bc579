"""Retry decisions for failed deliveries: redeliver after a backoff, or dead-letter."""

from __future__ import annotations

import random
from dataclasses import dataclass

from arrival.model import Backoff

__all__ = ["DeadLetter", "Retry", "backoff_delay", "decide_retry"]


@dataclass(frozen=True, slots=True)
class Retry:
    delay_s: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str


def backoff_delay(failures: int, policy: Backoff, rng: random.Random) -> float:
    """Delay in seconds before the redelivery that follows the ``failures``-th failure."""
    if failures < 1:
        return 0.0
    if policy.initial_s <= 0:
        return 0.0
    exponent = min(failures - 1, 1024)  # avoid float overflow on absurd counts
    try:
        base = policy.initial_s * policy.multiplier**exponent
    except OverflowError:
        base = policy.max_s
    base = min(policy.max_s, base)
    return base * (1.0 - policy.jitter * rng.random())


def decide_retry(
    failures: int,
    max_deliveries: int | None,
    policy: Backoff,
    rng: random.Random,
    requested_delay_s: float | None = None,
) -> Retry | DeadLetter:
    """After the ``failures``-th failed attempt: redeliver later, or give up.

    ``requested_delay_s`` (from ``nack(delay=...)``) overrides the backoff policy.
    """
    if max_deliveries is not None and failures >= max_deliveries:
        return DeadLetter(f"failed {failures} of max_deliveries={max_deliveries} attempts")
    if requested_delay_s is not None:
        return Retry(max(0.0, requested_delay_s))
    return Retry(backoff_delay(failures, policy, rng))
