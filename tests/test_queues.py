"""Declaring queues: persistence, the contract check, describe(), and bad input."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import arrival
from arrival.errors import (
    DataDirectoryInUse,
    GuaranteeMismatch,
    InvalidQueueSpec,
    MessageTooLarge,
    NotSupported,
    QueueSpecConflict,
    UnknownQueue,
    UsageError,
)
from conftest import Stores

# -- declaring -------------------------------------------------------------------------


def test_create_queue_persists_across_reopen(stores: Stores) -> None:
    b1 = stores.open()
    spec = b1.create_queue(
        "orders", "at-least-once", ack_timeout=12.0, max_deliveries=4, retention=60.0
    )
    assert spec.guarantee is arrival.Guarantee.AT_LEAST_ONCE
    assert spec.dead_letter == "orders.dlq"
    b1.close()

    b2 = stores.open()
    assert b2.queues() == ["orders", "orders.dlq"]
    stored = b2.describe("orders").spec
    assert stored == spec
    assert (stored.ack_timeout, stored.max_deliveries, stored.retention) == (12.0, 4, 60.0)
    # the stored spec is usable: sends and receives work without declaring again
    b2.producer().send("orders", b"x")
    msg = b2.consumer("orders", "g").receive(timeout=0)
    assert msg is not None
    assert msg.body == b"x"


def test_redeclare_same_settings_is_a_noop(stores: Stores) -> None:
    b1 = stores.open()
    spec = b1.create_queue("q", "at-least-once", max_deliveries=3, ack_timeout=5.0)
    b1.producer().send("q", b"kept")
    assert b1.create_queue("q", "at-least-once", max_deliveries=3, ack_timeout=5.0) == spec
    b1.close()
    b2 = stores.open()
    # also after a reopen (the spec went through the store)
    assert b2.create_queue("q", "at-least-once", max_deliveries=3, ack_timeout=5.0) == spec
    assert b2.queues() == ["q", "q.dlq"]
    msg = b2.consumer("q", "g").receive(timeout=0)
    assert msg is not None
    assert msg.body == b"kept"


def test_redeclare_with_other_settings_names_the_difference(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=3)
    with pytest.raises(QueueSpecConflict) as info:
        broker.create_queue("q", "at-least-once", max_deliveries=7)
    err = info.value
    assert type(err) is QueueSpecConflict
    assert err.differences == {"max_deliveries": (3, 7)}
    assert "max_deliveries" in str(err)
    assert "'q'" in str(err)
    assert broker.describe("q").spec.max_deliveries == 3  # unchanged


def test_redeclare_with_other_guarantee_raises_guarantee_mismatch(
    broker: arrival.Broker,
) -> None:
    broker.create_queue("q", "at-least-once")
    with pytest.raises(GuaranteeMismatch) as info:
        broker.create_queue("q", "at-most-once")
    assert "guarantee" in info.value.differences
    stored, declared = info.value.differences["guarantee"]
    assert (stored, declared) == ("at-least-once", "at-most-once")
    assert "guarantee" in str(info.value)
    assert broker.describe("q").guarantee is arrival.Guarantee.AT_LEAST_ONCE


def test_at_least_once_refuses_capacity(broker: arrival.Broker) -> None:
    with pytest.raises(InvalidQueueSpec, match="capacity") as info:
        broker.create_queue("q", "at-least-once", capacity=10)
    assert "at-most-once" in str(info.value)  # says what to use instead
    assert "q" not in broker.queues()


@pytest.mark.parametrize("option", ["drop", "conflate"])
def test_at_least_once_refuses_lossy_options(broker: arrival.Broker, option: str) -> None:
    value: object = "newest" if option == "drop" else True
    with pytest.raises(InvalidQueueSpec, match=option):
        broker.create_queue("q", "at-least-once", **{option: value})  # type: ignore[arg-type]


def test_at_most_once_refuses_max_deliveries(broker: arrival.Broker) -> None:
    with pytest.raises(InvalidQueueSpec, match="max_deliveries") as info:
        broker.create_queue("q", "at-most-once", max_deliveries=3)
    assert "never redelivers" in str(info.value)
    assert "q" not in broker.queues()


def test_dead_letter_none_with_a_budget_is_refused(broker: arrival.Broker) -> None:
    with pytest.raises(InvalidQueueSpec, match="max_deliveries=5") as info:
        broker.create_queue("q", "at-least-once", dead_letter=None, max_deliveries=5)
    assert "dead_letter=None" in str(info.value)
    assert broker.queues() == []


def test_no_dead_letter_queue_with_unlimited_retries_is_allowed(broker: arrival.Broker) -> None:
    spec = broker.create_queue("q", "at-least-once", dead_letter=None, max_deliveries=None)
    assert (spec.dead_letter, spec.max_deliveries) == (None, None)
    assert broker.queues() == ["q"]


def test_exactly_once_queue_is_created_with_dedup(broker: arrival.Broker) -> None:
    spec = broker.create_queue("pay", "exactly-once")
    assert spec.dedup
    assert spec.dead_letter == "pay.dlq"
    assert broker.queues() == ["pay", "pay.dlq"]
    d = broker.describe("pay")
    assert "stored once and processed once" in d.promise
    assert any("confirmed commits" in m for m in d.mechanism)
    assert d.limits["dedup_window"] == "604800 s"
    assert "producer_state" in d.limits


def test_unknown_guarantee_is_refused(broker: arrival.Broker) -> None:
    with pytest.raises(InvalidQueueSpec, match="at-least-once"):
        broker.create_queue("q", "twice")


# -- unknown queues --------------------------------------------------------------------


def test_send_to_unknown_queue_says_to_create_it(broker: arrival.Broker) -> None:
    with pytest.raises(UnknownQueue) as info:
        broker.producer().send("nope", b"x")
    assert info.value.queue == "nope"
    assert "does not exist" in str(info.value)
    assert "create_queue('nope'" in str(info.value)


def test_consumer_of_unknown_queue_says_to_create_it(broker: arrival.Broker) -> None:
    with pytest.raises(UnknownQueue, match=r"create_queue\('nope'"):
        broker.consumer("nope", "g")
    with pytest.raises(UnknownQueue):
        broker.stats("nope")
    with pytest.raises(UnknownQueue):
        broker.describe("nope")


# -- describe --------------------------------------------------------------------------


def test_describe_at_least_once(broker: arrival.Broker) -> None:
    broker.create_queue(
        "orders", "at-least-once", ack_timeout=12.0, max_deliveries=5, max_message_bytes=4096
    )
    d = broker.describe("orders")
    assert d.name == "orders"
    assert d.guarantee is arrival.Guarantee.AT_LEAST_ONCE
    assert "delivered more than once" in d.promise
    mech = "\n".join(d.mechanism)
    assert "fsync" in mech
    assert "lease of 12 s" in mech
    assert "'orders.dlq'" in mech
    assert "after 5 failed attempts" in mech
    assert "per-key order" in mech
    assert d.limits["ack_timeout"] == "12 s"
    assert d.limits["max_deliveries"] == "5"
    assert d.limits["max_message_bytes"] == "4096"
    assert "fsync" in d.limits
    assert "at-least-once" in str(d)


def test_describe_at_most_once(broker: arrival.Broker) -> None:
    broker.create_queue("ticks", "at-most-once", capacity=50, drop="newest", conflate=True)
    d = broker.describe("ticks")
    assert d.guarantee is arrival.Guarantee.AT_MOST_ONCE
    assert "at most once" in d.promise
    assert "never duplicated" in d.promise
    mech = "\n".join(d.mechanism)
    assert "never waits for fsync" in mech
    assert "50 messages" in mech
    assert "newest" in mech
    assert "conflated by key" in mech
    assert d.limits["capacity"] == "50"
    assert d.limits["drop"] == "newest"


# -- bad messages ----------------------------------------------------------------------


def test_message_too_large_names_size_and_limit(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once", max_message_bytes=100)
    p = broker.producer()
    assert p.send("q", b"x" * 100) == 0  # exactly the limit is fine
    with pytest.raises(MessageTooLarge) as info:
        p.send("q", b"x" * 101)
    err = info.value
    assert (err.queue, err.size_bytes, err.limit_bytes) == ("q", 101, 100)
    assert "101 bytes" in str(err)
    assert "100 bytes" in str(err)
    assert broker.stats("q").end_offset == 1  # nothing of the refused message stored


def test_batch_with_a_too_large_message_stores_none(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once", max_message_bytes=10)
    p = broker.producer()
    with pytest.raises(MessageTooLarge):
        p.send_batch("q", [b"ok", b"x" * 11, b"ok"])
    assert broker.stats("q").end_offset == 0
    with pytest.raises(UsageError, match="at least one message"):
        p.send_batch("q", [])
    assert p.send_batch("q", [b"a", b"b"]) == 0


def test_message_too_large_counts_headers(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once", max_message_bytes=100)
    with pytest.raises(MessageTooLarge) as info:
        broker.producer().send("q", b"x" * 90, headers={"hhhhh": "vvvvvvvvvv"})
    assert info.value.size_bytes == 105


def test_message_too_large_on_at_most_once(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-most-once", max_message_bytes=10)
    with pytest.raises(MessageTooLarge):
        broker.producer().send("q", b"x" * 11)


def test_body_must_be_bytes(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    p = broker.producer()
    with pytest.raises(TypeError, match="encode"):
        p.send("q", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes, not int"):
        p.send("q", 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="encode"):
        p.send_batch("q", [b"ok", "text"])
    assert broker.stats("q").end_offset == 0  # the batch with a bad item stored nothing
    assert p.send("q", bytearray(b"ba")) == 0  # type: ignore[arg-type]  # bytes-like is fine


def test_key_headers_and_id_types_are_checked(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    p = broker.producer()
    with pytest.raises(TypeError, match="key must be a str"):
        p.send("q", b"x", key=7)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="headers must map str to str"):
        p.send("q", b"x", headers={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="headers must map str to str"):
        p.send("q", b"x", headers={1: "n"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="headers must be a mapping"):
        p.send("q", b"x", headers=[("a", "b")])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="id must be a str"):
        p.send("q", b"x", id=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key must be a str"):
        p.send_batch("q", [arrival.Envelope(b"x", key=1)])  # type: ignore[arg-type]
    assert broker.stats("q").end_offset == 0


def test_closed_producer_refuses_sends(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    p = broker.producer()
    p.close()
    with pytest.raises(arrival.errors.ClosedError, match="closed"):
        p.send("q", b"x")


# -- connecting ------------------------------------------------------------------------


def test_a_nats_url_without_nats_py_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)  # as if nats-py were not installed
    url = "nats://127.0.0.1:4222"
    with pytest.raises(NotSupported, match=r"pip install 'arrival\[nats\]'") as info:
        arrival.connect(url)
    assert url in str(info.value)


def test_a_nats_url_refuses_options_for_embedded_brokers() -> None:
    with pytest.raises(UsageError, match="embedded brokers"):
        arrival.connect("nats://127.0.0.1:4222", producer_horizon=60.0)


def test_unknown_scheme_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown scheme 'ftp'") as info:
        arrival.connect("ftp://host/x")
    assert not isinstance(info.value, NotSupported)


def test_memory_url() -> None:
    with arrival.connect("memory:") as b:
        b.create_queue("q", "at-least-once")
        assert b.producer().send("q", b"x") == 0
        assert b.describe("q").limits["fsync"] == "none (memory)"


def test_second_connect_to_a_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data"
    first = arrival.connect(path)
    try:
        first.create_queue("q", "at-least-once")
        with pytest.raises(DataDirectoryInUse) as info:
            arrival.connect(path)
        assert info.value.owner_pid == os.getpid()
        assert f"process {os.getpid()}" in str(info.value)
        assert str(path) in str(info.value)
        # the refused connect did not disturb the owner
        assert first.producer().send("q", b"x") == 0
    finally:
        first.close()
    # once closed, the directory can be opened again, with its queue
    with arrival.connect(str(path)) as again:
        assert again.queues() == ["q", "q.dlq"]
