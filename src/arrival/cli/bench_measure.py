"""What ``arrival bench`` measures besides counts: latency histograms and process memory.

Latencies go into a log-bucketed histogram (1% wide buckets from 1 µs to 3 hours), so a
consumer's memory stays the same however many messages it processes: a bench that kept
every latency would itself grow by 8 bytes a message, which in an embedded run is the
broker's process. Percentiles are the geometric middle of their bucket (within 0.5%),
clamped to the exact minimum and maximum seen.

Memory comes from ``/proc/PID/status`` (``VmRSS`` now, ``VmHWM`` the peak); writing 5 to
``/proc/PID/clear_refs`` resets the peak, so a run's peak is the run's own even when the
process (the bench, or a server shared by several runs) lived before it.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import threading
import time
from array import array
from collections import Counter

__all__ = ["LatencyHistogram", "RssProbe", "RssSampler", "own_peak_rss"]

_MIN_S = 1e-6
_PER_E = 100.0  # buckets per factor e: 1% wide
_BUCKETS = int(math.log(1e4 / _MIN_S) * _PER_E) + 1


class LatencyHistogram:
    """Counts of latencies in 1% buckets, with the exact count, minimum and maximum."""

    __slots__ = ("counts", "maximum", "minimum", "total")

    def __init__(self) -> None:
        self.counts = array("q", bytes(8 * _BUCKETS))
        self.total = 0
        self.minimum = math.inf
        self.maximum = 0.0

    def add_stamps(self, now: float, stamps: Counter[tuple[float]]) -> None:
        """Record ``now - t`` for each send time ``t`` (as ``struct.unpack`` gives it),
        ``n`` times each; a time of 0 or less (a backlog message) is not recorded."""
        counts, log = self.counts, math.log
        top = _BUCKETS - 1
        for (t,), n in stamps.items():
            if t <= 0.0:
                continue
            lat = now - t
            if lat < self.minimum:
                self.minimum = lat
            if lat > self.maximum:
                self.maximum = lat
            i = int(log(lat / _MIN_S) * _PER_E) if lat > _MIN_S else 0
            counts[i if i < top else top] += n
            self.total += n

    def merge(self, other: LatencyHistogram) -> None:
        for i, n in enumerate(other.counts):
            if n:
                self.counts[i] += n
        self.total += other.total
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)

    def percentile(self, q: float) -> float:
        """The latency (seconds) below which a fraction ``q`` of the recorded ones lie;
        NaN when nothing was recorded."""
        if self.total == 0:
            return math.nan
        rank = min(self.total - 1, int(q * self.total))
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen > rank:
                mid = _MIN_S * math.exp((i + 0.5) / _PER_E)
                return min(max(mid, self.minimum), self.maximum)
        return self.maximum  # pragma: no cover - the counts add up to total


def _status_bytes(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024  # "VmRSS:   12345 kB"
    except (OSError, ValueError, IndexError):
        return None
    return None


def own_peak_rss() -> int:
    """This process's peak resident set size in bytes, as the kernel counted it."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RssProbe:
    """The memory of one process (None: unknown, e.g. a server bench did not start)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid

    def rss(self) -> int | None:
        return None if self.pid is None else _status_bytes(self.pid, "VmRSS:")

    def peak(self) -> int | None:
        if self.pid is None:
            return None
        peak = _status_bytes(self.pid, "VmHWM:")
        if peak is None and self.pid == os.getpid():
            return own_peak_rss()
        return peak

    def reset_peak(self) -> bool:
        """Start counting the peak again from now; False where the kernel does not let us
        (the peak then covers the process's whole life)."""
        if self.pid is None:
            return False
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return True


class RssSampler:
    """Samples a process's RSS once a second (and on stop, and when asked) into
    ``timeline``: ``[seconds since start, bytes]`` pairs."""

    def __init__(self, probe: RssProbe, start: float, interval: float = 1.0) -> None:
        self.probe = probe
        self.start = start
        self.interval = interval
        self.timeline: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def sample(self) -> int | None:
        rss = self.probe.rss()
        if rss is not None:
            self.timeline.append([round(time.time() - self.start, 3), rss])
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        if self.probe.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()
