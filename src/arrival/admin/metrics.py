"""Prometheus metrics of one broker, read from the engine's stats at scrape time.

Nothing is counted per message for them: the engine keeps its counters anyway
(``Engine.stats``, ``Engine.info``, ``Engine.fsync_histogram``), and a scrape turns them
into metric families. The collector lives in a ``CollectorRegistry`` of its own, so a
process embedding arrival keeps its global registry to itself.

Names follow Prometheus conventions: an ``arrival_`` prefix, base units (seconds),
counters ending in ``_total``, labels ``queue`` and ``group``. docs/operations.md lists
every metric with its meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from arrival import __version__
from arrival.engine import Engine
from arrival.errors import UnknownQueue

__all__ = ["CONTENT_TYPE", "ArrivalCollector", "registry_for", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (attribute of GroupStats, metric name, help) of the per-group counters
_GROUP_COUNTERS = (
    (
        "delivered",
        "arrival_group_delivered",
        "Deliveries to the group's consumers, redeliveries included.",
    ),
    ("acked", "arrival_group_acked", "Messages the group acknowledged."),
    (
        "redelivered",
        "arrival_group_redelivered",
        "Deliveries that were a second or later attempt.",
    ),
    ("nacked", "arrival_group_nacked", "Negative acknowledgements (nack) by the group."),
    (
        "expired",
        "arrival_group_expired",
        "Leases that ran out before the consumer settled the message.",
    ),
    ("dead_lettered", "arrival_group_dead_lettered", "Messages moved to the dead-letter queue."),
    (
        "dropped",
        "arrival_group_dropped",
        "At-most-once: messages dropped before the group received them.",
    ),
)

# (attribute of GroupStats, metric name, help) of the per-group gauges
_GROUP_GAUGES = (
    (
        "backlog",
        "arrival_group_backlog_messages",
        "Messages retained that the group has not settled (its lag).",
    ),
    (
        "in_flight",
        "arrival_group_in_flight_messages",
        "Messages leased to a consumer and not yet settled.",
    ),
    (
        "waiting_retry",
        "arrival_group_waiting_retry_messages",
        "Failed messages waiting for their retry backoff.",
    ),
    (
        "oldest_unacked_age",
        "arrival_group_oldest_unacked_age_seconds",
        "Seconds since the oldest message the group has not settled was stored; 0 when none.",
    ),
    ("consumers", "arrival_group_consumers", "Consumers of the group open now."),
)


class ArrivalCollector:
    """Turns an engine's stats into metric families at each scrape.

    ``connections`` (optional) returns the number of open client connections; a server
    passes it, an embedded broker has none and the metric is left out.
    """

    def __init__(self, engine: Engine, connections: Callable[[], int] | None = None) -> None:
        self.engine = engine
        self.connections = connections

    def __repr__(self) -> str:
        return f"<ArrivalCollector of {self.engine!r}>"

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        info = engine.info()
        build = InfoMetricFamily("arrival_build", "The arrival version serving these metrics.")
        build.add_metric([], {"version": __version__})
        yield build
        yield GaugeMetricFamily(
            "arrival_broker_epoch",
            "Times the data directory has been opened (this run's epoch).",
            value=info.epoch,
        )
        yield GaugeMetricFamily("arrival_queues", "Queues declared.", value=info.queues)
        yield CounterMetricFamily(
            "arrival_commits", "Store commits since the broker opened.", value=info.commits
        )
        yield CounterMetricFamily(
            "arrival_fsyncs",
            "Durable (fsynced) commits since the broker opened; concurrent sends share one.",
            value=info.fsyncs,
        )
        hist = engine.fsync_histogram()
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(hist.bounds, hist.counts, strict=False):
            total += n
            buckets.append((repr(float(bound)), total))  # as Go prints it: 0.0005, 5.0
        buckets.append(("+Inf", hist.count))
        yield HistogramMetricFamily(
            "arrival_fsync_duration_seconds",
            "Duration of each durable (fsynced) commit, in seconds.",
            buckets=buckets,
            sum_value=hist.sum_s,
        )
        if self.connections is not None:
            yield GaugeMetricFamily(
                "arrival_connections", "Client connections open now.", value=self.connections()
            )
        yield from self._queues()

    def _queues(self) -> Iterator[Metric]:
        q_info = InfoMetricFamily(
            "arrival_queue", "Each queue and its delivery guarantee.", labels=["queue"]
        )
        stored = GaugeMetricFamily(
            "arrival_queue_stored_messages", "Messages the queue retains.", labels=["queue"]
        )
        sent = CounterMetricFamily(
            "arrival_queue_sent",
            "Messages the queue accepted since the broker opened.",
            labels=["queue"],
        )
        dropped = CounterMetricFamily(
            "arrival_queue_dropped",
            "At-most-once: messages dropped on overflow since the broker opened, all groups.",
            labels=["queue"],
        )
        labels = ["queue", "group"]
        counters = [
            (attr, CounterMetricFamily(name, doc, labels=labels))
            for attr, name, doc in _GROUP_COUNTERS
        ]
        gauges = [
            (attr, GaugeMetricFamily(name, doc, labels=labels)) for attr, name, doc in _GROUP_GAUGES
        ]
        for name in self.engine.queue_names():
            try:
                st = self.engine.stats(name)
            except UnknownQueue:  # pragma: no cover - queues are never removed
                continue
            q_info.add_metric([name], {"guarantee": str(st.guarantee)})
            stored.add_metric([name], st.stored)
            sent.add_metric([name], st.sent)
            dropped.add_metric([name], st.dropped)
            for g in st.groups:
                for attr, counter in counters:
                    counter.add_metric([name, g.group], float(getattr(g, attr)))
                for attr, gauge in gauges:
                    gauge.add_metric([name, g.group], float(getattr(g, attr)))
        yield q_info
        yield stored
        yield sent
        yield dropped
        for _attr, counter in counters:
            yield counter
        for _attr, gauge in gauges:
            yield gauge


def registry_for(engine: Engine, connections: Callable[[], int] | None = None) -> CollectorRegistry:
    """A registry of its own holding an ``ArrivalCollector`` of ``engine``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ArrivalCollector(engine, connections))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in the Prometheus text format (``CONTENT_TYPE``)."""
    return generate_latest(registry)
