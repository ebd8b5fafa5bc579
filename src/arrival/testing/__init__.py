"""Tools for testing code that uses arrival, and arrival itself: a fake clock, crashes.

Nothing in ``arrival`` imports this package.
"""

from __future__ import annotations

import threading

__all__ = ["FakeClock"]


class FakeClock:
    """A clock that moves only when told: ``clock.advance(30)`` expires 30 s leases now.

    Pass it to ``arrival.connect("memory:", clock=clock)``.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a FakeClock never goes backwards")
        with self._lock:
            self._now += seconds

    def __repr__(self) -> str:
        return f"<FakeClock now={self._now:.3f}>"
