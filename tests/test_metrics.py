"""Prometheus metrics (``arrival.admin.metrics``): values after a scenario, the oldest
unacked age on a fake clock, the fsync histogram, and the text format itself."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

import arrival
from arrival.admin import ArrivalCollector, registry_for
from arrival.admin.metrics import render
from arrival.engine import FSYNC_BUCKETS_S
from arrival.storage.base import WriteSet
from arrival.storage.memory import MemoryStorage
from arrival.testing import FakeClock
from conftest import NO_BACKOFF

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(broker: arrival.Broker, connections: int | None = None) -> Samples:
    """Render the broker's metrics as text and parse them back, as Prometheus would."""
    count = None if connections is None else (lambda: connections)
    text = render(registry_for(broker.engine, count)).decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def group(samples: Samples, name: str, queue: str, grp: str) -> float:
    return samples[(name, (("group", grp), ("queue", queue)))]


def queue_sample(samples: Samples, name: str, queue: str) -> float:
    return samples[(name, (("queue", queue),))]


@pytest.fixture
def memory(clock: FakeClock) -> Iterator[arrival.Broker]:
    broker = arrival.connect("memory:", clock=clock)
    yield broker
    broker.close()


def test_group_and_queue_metrics_match_a_scenario(memory: arrival.Broker) -> None:
    broker = memory
    broker.create_queue("orders", "at-least-once", max_deliveries=5, backoff=NO_BACKOFF)
    broker.create_queue("ticks", "at-most-once", capacity=2)
    producer = broker.producer()
    for i in range(4):
        producer.send("orders", f"order {i}".encode(), key=f"k{i}")
    consumer = broker.consumer("orders", group="billing")
    first, second, third = (consumer.receive(timeout=0) for _ in range(3))
    assert first is not None
    assert second is not None
    assert third is not None
    first.ack()
    second.nack(delay=0, error="bank timeout")
    third.reject("malformed")
    again = consumer.receive(timeout=0)  # the nacked one, redelivered
    assert again is not None
    assert again.attempt == 2
    ticks = broker.consumer("ticks", group="ui")
    for i in range(5):  # capacity 2: three are dropped before "ui" gets them
        producer.send("ticks", f"tick {i}".encode())
    broker.engine.flush().wait()

    m = scrape(broker)
    g = next(x for x in broker.stats("orders").groups if x.group == "billing")
    expected = {
        "arrival_group_delivered_total": g.delivered,
        "arrival_group_acked_total": 1,
        "arrival_group_redelivered_total": 1,
        "arrival_group_nacked_total": 1,
        "arrival_group_dead_lettered_total": 1,
        "arrival_group_expired_total": 0,
        "arrival_group_dropped_total": 0,
        # 4 sent, 1 acked, 1 rejected: 2 unsettled, one of them leased (the redelivery)
        "arrival_group_backlog_messages": 2,
        "arrival_group_in_flight_messages": 1,
        "arrival_group_waiting_retry_messages": 0,
        "arrival_group_consumers": 1,
    }
    for name, value in expected.items():
        assert group(m, name, "orders", "billing") == value, name
    assert g.delivered == 4  # three first deliveries and one redelivery
    assert queue_sample(m, "arrival_queue_sent_total", "orders") == 4
    stored = broker.stats("orders").stored  # retention 0: settled batches may be trimmed
    assert queue_sample(m, "arrival_queue_stored_messages", "orders") == stored >= 2
    # the dead letter sits in orders.dlq, listed through its "~dlq" group
    assert group(m, "arrival_group_backlog_messages", "orders.dlq", "~dlq") == 1

    assert group(m, "arrival_group_dropped_total", "ticks", "ui") == 3
    assert group(m, "arrival_group_backlog_messages", "ticks", "ui") == 2
    assert queue_sample(m, "arrival_queue_dropped_total", "ticks") == 3
    assert queue_sample(m, "arrival_queue_sent_total", "ticks") == 5
    assert m[("arrival_queue_info", (("guarantee", "at-most-once"), ("queue", "ticks")))] == 1
    assert ticks.receive(timeout=0) is not None

    info = broker.info()  # read after the scrape: the writer may have committed since
    assert 0 < m[("arrival_commits_total", ())] <= info.commits
    assert 0 < m[("arrival_fsyncs_total", ())] <= info.fsyncs
    assert m[("arrival_broker_epoch", ())] == info.epoch
    assert m[("arrival_queues", ())] == len(broker.queues())
    assert m[("arrival_build_info", (("version", arrival.__version__),))] == 1
    # an embedded broker has no client connections: the metric is left out
    assert not any(name == "arrival_connections" for name, _ in m)


def test_connections_come_from_the_callable_given(memory: arrival.Broker) -> None:
    assert scrape(memory, connections=3)[("arrival_connections", ())] == 3


def test_counters_grow_between_scrapes(memory: arrival.Broker) -> None:
    memory.create_queue("q", "at-least-once")
    consumer = memory.consumer("q", group="g")
    memory.producer().send("q", b"one")
    before = scrape(memory)
    memory.producer().send("q", b"two")
    msg = consumer.receive(timeout=0)
    assert msg is not None
    msg.ack()
    after = scrape(memory)
    assert queue_sample(after, "arrival_queue_sent_total", "q") == (
        queue_sample(before, "arrival_queue_sent_total", "q") + 1
    )
    assert group(after, "arrival_group_acked_total", "q", "g") == (
        group(before, "arrival_group_acked_total", "q", "g") + 1
    )


def test_oldest_unacked_age_follows_the_clock(memory: arrival.Broker, clock: FakeClock) -> None:
    memory.create_queue("q", "at-least-once", ack_timeout=600)
    memory.create_queue("lossy", "at-most-once", capacity=10)
    consumer = memory.consumer("q", group="g")
    lossy = memory.consumer("lossy", group="g")
    age = "arrival_group_oldest_unacked_age_seconds"
    assert group(scrape(memory), age, "q", "g") == 0.0  # nothing to settle

    memory.producer().send("q", b"old")
    memory.producer().send("lossy", b"old")
    clock.advance(7.5)
    memory.producer().send("q", b"new")
    clock.advance(2.5)
    m = scrape(memory)
    assert group(m, age, "q", "g") == pytest.approx(10.0)
    assert group(m, age, "lossy", "g") == pytest.approx(10.0)

    old = consumer.receive(timeout=0)
    assert old is not None
    assert old.body == b"old"
    clock.advance(5.0)  # leased, not settled: still the oldest unacked
    assert group(scrape(memory), age, "q", "g") == pytest.approx(15.0)
    old.ack()  # now the oldest unsettled is the one sent 7.5 s later
    assert group(scrape(memory), age, "q", "g") == pytest.approx(7.5)
    new = consumer.receive(timeout=0)
    assert new is not None
    new.ack()
    assert lossy.receive(timeout=0) is not None  # handed out: settled at once
    m = scrape(memory)
    assert group(m, age, "q", "g") == 0.0
    assert group(m, age, "lossy", "g") == 0.0
    assert memory.stats("q").groups[0].oldest_unacked_age == 0.0


def test_fsync_histogram_counts_every_fsync_on_disk(tmp_path: Path) -> None:
    with arrival.connect(str(tmp_path / "data")) as broker:
        broker.create_queue("q", "at-least-once")
        producer = broker.producer()
        for i in range(5):
            producer.send("q", f"m{i}".encode())
        broker.engine.flush().wait()
        hist = broker.engine.fsync_histogram()
        info = broker.info()
        assert info.fsyncs >= 6  # open, create_queue, five sends (some may share one)
        assert hist.count == info.fsyncs
        assert hist.sum_s > 0
        m = scrape(broker)
    assert m[("arrival_fsync_duration_seconds_count", ())] == info.fsyncs
    assert m[("arrival_fsync_duration_seconds_bucket", (("le", "+Inf"),))] == info.fsyncs
    assert m[("arrival_fsync_duration_seconds_sum", ())] == pytest.approx(hist.sum_s)
    cumulative = [
        m[("arrival_fsync_duration_seconds_bucket", (("le", repr(b)),))] for b in FSYNC_BUCKETS_S
    ]
    assert cumulative == sorted(cumulative)  # buckets are cumulative


class _SlowSyncs(MemoryStorage):
    """Every durable commit takes at least ``delay_s``, like a slow fsync."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def commit(self, ws: WriteSet) -> None:
        if ws.sync:
            time.sleep(self.delay_s)
        super().commit(ws)


def test_fsync_histogram_puts_slow_fsyncs_in_high_buckets() -> None:
    delay = 0.03  # above the 0.025 s bound: none may land at or below it
    with arrival.connect(_SlowSyncs(delay)) as broker:
        broker.create_queue("q", "at-least-once")
        broker.producer().send("q", b"m")
        hist = broker.engine.fsync_histogram()
        m = scrape(broker)
    assert hist.count == broker.info().fsyncs >= 3
    assert m[("arrival_fsync_duration_seconds_bucket", (("le", "0.025"),))] == 0
    assert hist.sum_s >= delay * hist.count
    assert sum(hist.counts[: FSYNC_BUCKETS_S.index(0.025) + 1]) == 0


def test_collector_stays_out_of_the_global_registry(memory: arrival.Broker) -> None:
    registry = registry_for(memory.engine)
    assert registry is not prometheus_client.REGISTRY
    global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "arrival_" not in global_text
    assert "arrival_commits_total" in render(registry).decode()
    assert "ArrivalCollector" in repr(ArrivalCollector(memory.engine))


def test_every_metric_parses_with_help_and_type(memory: arrival.Broker) -> None:
    memory.create_queue("q", "exactly-once")
    memory.consumer("q", group="g")
    text = render(registry_for(memory.engine, lambda: 0)).decode()
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    assert all(n.startswith("arrival_") for n in names)
    assert all(f.documentation for f in families)
    types = {f.name: f.type for f in families}
    assert types["arrival_fsync_duration_seconds"] == "histogram"
    assert types["arrival_group_acked"] == "counter"
    assert types["arrival_group_oldest_unacked_age_seconds"] == "gauge"
    assert types["arrival_connections"] == "gauge"
