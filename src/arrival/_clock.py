"""The clock the engine reads. Tests inject ``arrival.testing.FakeClock`` instead."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch; must never go backwards within a process."""
        ...


class SystemClock:
    """Wall-clock seconds that never jump within a process.

    Anchored once to ``time.time()`` and advanced by ``time.monotonic()``, so a system
    clock step cannot expire every lease at once or hold them forever; across restarts
    it follows the wall clock, which persisted retry times need.
    """

    def __init__(self) -> None:
        self._anchor = time.time() - time.monotonic()

    def now(self) -> float:
        return self._anchor + time.monotonic()

    def __repr__(self) -> str:
        return f"<SystemClock now={self.now():.3f}>"
