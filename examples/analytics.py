"""Analytics: at-most-once and bounded; a slow consumer loses old events, never the
broker's memory.

Run it: ``python examples/analytics.py`` (on ``memory:``; about two seconds).
As a worker: ``arrival worker examples.analytics:app --url ./data`` from the
repository's root.

Why at-most-once: a page view lost in a crash or an overflow moves a chart by a pixel.
Making each one durable would cost an fsync per batch, and a stalled dashboard would make
the broker keep every event it missed. At-most-once sends never wait for the disk, and
each queue is bounded: when its consumer falls behind, the queue drops (and counts) the
oldest events instead of growing.

What happens, with the dashboard running in a thread:
1. ``pageviews`` holds at most 1,000 events per consumer group and drops the oldest. The
   site sends 20,000 page views as fast as it can while the dashboard spends about a
   millisecond on each. The queue never holds more than 1,000; the views the dashboard
   could not keep up with are dropped and counted; it ends with the newest.
2. ``metrics`` is conflated: it keeps only the latest value of each key (a gauge's
   name). Four gauges change 500 times each; the dashboard sees some of the values,
   never an older one after a newer one, and ends with the latest value of each.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

import arrival

CAPACITY = 1_000
PAGEVIEWS: dict[str, Any] = {"guarantee": "at-most-once", "capacity": CAPACITY, "drop": "oldest"}
METRICS: dict[str, Any] = {"guarantee": "at-most-once", "conflate": True}
VIEWS = 20_000
GAUGES = ["cpu.web-1", "cpu.web-2", "queue.depth", "users.online"]
UPDATES = 500  # per gauge
GAUGE_EVERY = VIEWS // (UPDATES * len(GAUGES))  # page views between two gauge updates
PATHS = ["/", "/pricing", "/docs", "/blog", "/signup"]
SLOW_S = 0.001  # what the dashboard spends on one page view (a database write, say)


class PageView(msgspec.Struct, frozen=True):
    seq: int
    path: str
    visitor: str


class Gauge(msgspec.Struct, frozen=True):
    name: str
    value: float
    seq: int


@dataclass
class Dashboard:
    """What the dashboard shows, and what it saw (thread-safe)."""

    views: Counter[str] = field(default_factory=Counter)
    last_view: int = -1
    gauges: dict[str, float] = field(default_factory=dict)
    gauge_seq: dict[str, int] = field(default_factory=dict)
    gauge_updates: int = 0
    stale_updates: int = 0  # a value older than one already shown: never, by conflation
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, view: PageView) -> None:
        time.sleep(SLOW_S)
        with self._lock:
            self.views[view.path] += 1
            self.last_view = max(self.last_view, view.seq)

    def caught_up(self, dropped: int) -> bool:
        """Every page view counted or ``dropped``, and the last value of every gauge shown."""
        with self._lock:
            counted = sum(self.views.values())
            latest = all(self.gauge_seq.get(g) == UPDATES - 1 for g in GAUGES)
        return counted + dropped == VIEWS and latest

    def show(self, gauge: Gauge) -> None:
        with self._lock:
            self.gauge_updates += 1
            if gauge.seq <= self.gauge_seq.get(gauge.name, -1):
                self.stale_updates += 1
                return
            self.gauge_seq[gauge.name] = gauge.seq
            self.gauges[gauge.name] = gauge.value


def make_app(broker: str | arrival.Broker, dashboard: Dashboard) -> arrival.App:
    """The dashboard worker: page views and gauges."""
    app = arrival.App(broker, name="dashboard")

    @app.handler("pageviews", **PAGEVIEWS)
    def count_view(view: PageView) -> None:
        dashboard.count(view)

    @app.handler("metrics", **METRICS)
    def show_gauge(gauge: Gauge) -> None:
        dashboard.show(gauge)

    return app


# ``arrival worker examples.analytics:app --url ./data`` runs this one.
app = make_app("./data", Dashboard())


def gauge_value(name: str, seq: int) -> float:
    """The value gauge ``name`` has at update ``seq`` (any function of both will do)."""
    return round(seq * 0.5 + len(name), 1)


@dataclass(frozen=True)
class Outcome:
    sent: int  # page views sent
    handled: int  # page views the dashboard counted
    dropped: int  # page views the queue dropped for the dashboard's group
    max_stored: int  # the most page views the queue held at once (sampled)
    last_view: int  # the newest page view the dashboard counted
    gauges: dict[str, float]  # what the dashboard shows
    gauge_updates: int  # gauge values the dashboard received
    stale_updates: int
    stats: list[arrival.HandlerStats]

    @property
    def ok(self) -> bool:
        return (
            self.handled + self.dropped == self.sent
            and self.max_stored <= CAPACITY
            and self.last_view == self.sent - 1
            and self.gauges == {g: gauge_value(g, UPDATES - 1) for g in GAUGES}
            and self.stale_updates == 0
        )


def wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(0.01)


@contextlib.contextmanager
def running(app: arrival.App) -> Iterator[None]:
    """Run ``app`` in a thread for the block; stop it gracefully after."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            app.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="dashboard")
    thread.start()
    try:
        yield
    finally:
        wait_until(lambda: app.running or not thread.is_alive(), 10.0, "the app starting")
        app.stop()
        thread.join(30.0)
    if failure:
        raise failure[0]


def main(url: str = "memory:") -> Outcome:
    broker = arrival.connect(url)
    try:
        return _run(broker)
    finally:
        broker.close()


def _run(broker: arrival.Broker) -> Outcome:
    broker.create_queue("pageviews", **PAGEVIEWS)
    broker.create_queue("metrics", **METRICS)
    dashboard = Dashboard()
    dash = make_app(broker, dashboard)
    producer = broker.producer()
    max_stored = 0

    def group(queue: str) -> arrival.GroupStats | None:
        return next(iter(broker.stats(queue).groups), None)

    with running(dash):
        # the dashboard's groups exist once its consumers joined: from then on they get
        # every event sent (the queue keeps up to CAPACITY for each group)
        wait_until(
            lambda: all(
                (g := group(q)) is not None and g.consumers for q in ("pageviews", "metrics")
            ),
            10.0,
            "the dashboard joining its queues",
        )
        print(
            f"the site sends {VIEWS:,} page views; the dashboard takes ~{SLOW_S * 1000:g} ms each"
        )
        for seq in range(VIEWS):
            view = PageView(seq, PATHS[seq % len(PATHS)], f"visitor-{seq % 997}")
            # JSON, which handlers decode by default; at-most-once: returns at once
            producer.send("pageviews", msgspec.json.encode(view))
            if seq % GAUGE_EVERY == 0:  # one gauge update every GAUGE_EVERY views
                n = seq // GAUGE_EVERY
                name, update = GAUGES[n % len(GAUGES)], n // len(GAUGES)
                gauge = Gauge(name, gauge_value(name, update), update)
                producer.send("metrics", msgspec.json.encode(gauge), key=name)
            if seq % 500 == 0:
                max_stored = max(max_stored, broker.stats("pageviews").stored)
        sent_at = time.monotonic()

        def drained() -> bool:
            # every view counted or dropped, and the latest value of every gauge shown
            views = group("pageviews")
            return dashboard.caught_up(views.dropped if views is not None else 0)

        wait_until(drained, 30.0, "the dashboard catching up")
    print(f"all sent; the dashboard caught up {time.monotonic() - sent_at:.1f} s later")

    views = group("pageviews")
    dropped = views.dropped if views is not None else 0
    stats = dash.stats()
    handled = sum(dashboard.views.values())
    print(
        f"page views: {VIEWS:,} sent, {handled:,} counted, {dropped:,} dropped "
        f"(the oldest); the queue held at most {max_stored:,} (capacity {CAPACITY:,})"
    )
    print(f"the newest view counted: #{dashboard.last_view:,} of #{VIEWS - 1:,}")
    print(
        f"gauges: {len(GAUGES) * UPDATES:,} values sent, {dashboard.gauge_updates:,} received, "
        f"{dashboard.stale_updates} older than one already shown"
    )
    print(f"dashboard shows: {dashboard.gauges}")
    return Outcome(
        sent=VIEWS,
        handled=handled,
        dropped=dropped,
        max_stored=max_stored,
        last_view=dashboard.last_view,
        gauges=dict(dashboard.gauges),
        gauge_updates=dashboard.gauge_updates,
        stale_updates=dashboard.stale_updates,
        stats=stats,
    )


if __name__ == "__main__":
    sys.exit(0 if main().ok else 1)
