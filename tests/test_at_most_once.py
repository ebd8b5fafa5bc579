"""at-most-once: fire-and-forget sends, bounded buffers, conflation, never a duplicate."""

from __future__ import annotations

import threading

import pytest

import arrival
from arrival.errors import NotSupported
from arrival.testing import FakeClock
from conftest import Stores, drain, engine_of
from conftest import bodies as _bodies


def _drain(consumer: arrival.Consumer) -> list[arrival.Message]:
    return drain(consumer, ack=False)  # at-most-once: nothing to ack


def test_send_returns_none_and_is_visible_at_once(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-most-once")
    c = broker.consumer("q", "g")
    syncs = engine_of(broker).storage.syncs
    p = broker.producer()
    assert p.send("q", b"a", key="k", headers={"h": "v"}, id="m-1") is None
    assert p.send_batch("q", [b"b", arrival.Envelope(b"c", key="kc")]) is None
    got = c.receive_batch(10, timeout=0)  # no commit to wait for
    assert [(m.body, m.key, m.headers, m.attempt) for m in got] == [
        (b"a", "k", {"h": "v"}, 1),
        (b"b", None, {}, 1),
        (b"c", "kc", {}, 1),
    ]
    assert got[0].id == "m-1"
    assert got[0].lease_deadline == 0.0
    assert engine_of(broker).storage.syncs == syncs  # nothing waited on fsync
    st = broker.stats("q")
    assert (st.guarantee, st.sent) == (arrival.Guarantee.AT_MOST_ONCE, 3)


def test_every_group_gets_every_message_once(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-most-once")
    a1 = broker.consumer("q", "a")
    a2 = broker.consumer("q", "a")
    b = broker.consumer("q", "b")
    broker.producer().send_batch("q", [b"%d" % i for i in range(10)])
    seen_a: list[bytes] = []
    while True:
        got = a1.receive_batch(3, timeout=0) + a2.receive_batch(2, timeout=0)
        if not got:
            break
        seen_a += _bodies(got)
    assert sorted(seen_a) == sorted(b"%d" % i for i in range(10))  # each exactly once
    assert _bodies(_drain(b)) == [b"%d" % i for i in range(10)]
    assert a1.receive(timeout=0) is None
    assert a2.receive(timeout=0) is None


def test_no_duplicate_with_concurrent_members(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-most-once")
    members = [broker.consumer("q", "g") for _ in range(4)]
    n = 2000
    broker.producer().send_batch("q", [b"%d" % i for i in range(n)])
    seen: list[list[bytes]] = [[] for _ in members]

    def take(i: int) -> None:
        while got := members[i].receive_batch(7, timeout=0):
            seen[i] += _bodies(got)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(members))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    every = [b for s in seen for b in s]
    assert len(every) == n
    assert len(set(every)) == n


def test_ack_is_a_noop_and_settling_is_not_supported(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    broker.create_queue("q", "at-most-once")
    broker.producer().send_batch("q", [b"x", b"y"])
    c = broker.consumer("q", "g")
    msg = c.receive(timeout=0)
    assert msg is not None
    msg.ack()
    msg.ack()  # still a no-op
    with pytest.raises(NotSupported, match="at-most-once"):
        msg.nack()
    with pytest.raises(NotSupported, match="at-most-once"):
        msg.nack(delay=1.0)
    with pytest.raises(NotSupported, match="at-most-once"):
        msg.reject("bad")
    with pytest.raises(NotSupported, match="at-most-once"):
        msg.extend(10.0)
    clock.advance(3600.0)
    # nothing was handed back by any of it: only the second message remains
    assert _bodies(_drain(c)) == [b"y"]
    c.ack_batch([msg])  # also a no-op


def test_capacity_drop_oldest_keeps_newest(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-most-once", capacity=3, drop="oldest")
    c = broker.consumer("q", "g")
    broker.producer().send_batch("q", [b"%d" % i for i in range(5)])
    st = broker.stats("q")
    assert st.dropped == 2
    (g,) = st.groups
    assert (g.group, g.dropped, g.backlog) == ("g", 2, 3)
    assert _bodies(_drain(c)) == [b"2", b"3", b"4"]


def test_capacity_drop_newest_keeps_oldest(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-most-once", capacity=3, drop="newest")
    c = broker.consumer("q", "g")
    broker.producer().send_batch("q", [b"%d" % i for i in range(5)])
    st = broker.stats("q")
    assert st.dropped == 2
    assert st.groups[0].dropped == 2
    assert _bodies(_drain(c)) == [b"0", b"1", b"2"]
    # room again: new messages are taken
    broker.producer().send("q", b"5")
    assert _bodies(_drain(c)) == [b"5"]


def test_capacity_without_any_group_counts_drops(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-most-once", capacity=2, drop="oldest")
    broker.producer().send_batch("q", [b"0", b"1", b"2", b"3"])
    assert broker.stats("q").dropped == 2
    assert _bodies(_drain(broker.consumer("q", "late"))) == [b"2", b"3"]


def test_conflate_keeps_latest_per_key(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-most-once", conflate=True)
    c = broker.consumer("q", "g")
    sends = [("a", b"a1"), ("b", b"b1"), ("a", b"a2"), ("c", b"c1"), ("b", b"b2"), ("a", b"a3")]
    p = broker.producer()
    for key, body in sends:
        p.send("q", body, key=key)
    p.send("q", b"nokey-1")
    p.send("q", b"nokey-2")  # messages without a key are never conflated
    got = _drain(c)
    assert {m.key: m.body for m in got if m.key} == {"a": b"a3", "b": b"b2", "c": b"c1"}
    assert len(got) == 5
    assert sorted(m.body for m in got if m.key is None) == [b"nokey-1", b"nokey-2"]
    assert broker.stats("q").dropped == 0  # conflated, not dropped


def test_late_group_gets_retained_messages(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-most-once")
    early = broker.consumer("q", "early")
    broker.producer().send_batch("q", [b"0", b"1", b"2"])
    assert _bodies(_drain(early)) == [b"0", b"1", b"2"]
    late = broker.consumer("q", "late")
    assert _bodies(_drain(late)) == [b"0", b"1", b"2"]
    latest = broker.consumer("q", "latest", start="latest")
    assert latest.receive(timeout=0) is None
    broker.producer().send("q", b"3")
    assert _bodies(_drain(latest)) == [b"3"]
    assert _bodies(_drain(early)) == [b"3"]


def test_receive_returns_none_when_empty(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-most-once")
    c = broker.consumer("q", "g")
    assert c.receive(timeout=0) is None
    assert c.receive(timeout=0.02) is None


def test_dead_letters_are_not_supported(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-most-once")
    assert broker.queues() == ["q"]  # no DLQ declared
    with pytest.raises(NotSupported, match="no dead-letter queue"):
        broker.dead_letters("q").list()


@pytest.mark.parametrize("how", ["close", "crash"])
def test_nothing_is_redelivered_after_a_restart(stores: Stores, how: str) -> None:
    b1 = stores.open()
    b1.create_queue("q", "at-most-once")
    b1.create_queue("durable", "at-least-once")
    c = b1.consumer("q", "g")
    b1.producer().send_batch("q", [b"0", b"1", b"2"])
    delivered = _bodies(c.receive_batch(2, timeout=0))
    assert delivered == [b"0", b"1"]
    if how == "close":
        b1.close()
    else:
        stores.crash(b1)

    b2 = stores.open()
    # the spec persists, the messages lived in memory: the queue is back, empty
    assert "q" in b2.queues()
    assert "durable" in b2.queues()
    assert b2.stats("q").stored == 0
    with pytest.raises(arrival.errors.QueueSpecConflict, match="capacity"):
        b2.create_queue("q", "at-most-once", capacity=5)
    b2.create_queue("q", "at-most-once")  # the same spec: a no-op
    c2 = b2.consumer("q", "g")
    assert c2.receive(timeout=0) is None
    assert _drain(b2.consumer("q", "other")) == []
    b2.producer().send("q", b"new")
    assert _bodies(_drain(c2)) == [b"new"]


def test_redeclare_at_most_once(broker: arrival.Broker) -> None:
    spec = broker.create_queue("q", "at-most-once", capacity=10, drop="newest")
    assert spec.drop is arrival.DropPolicy.NEWEST
    assert broker.create_queue("q", "at-most-once", capacity=10, drop="newest") == spec
    with pytest.raises(arrival.errors.QueueSpecConflict, match="capacity"):
        broker.create_queue("q", "at-most-once", capacity=20, drop="newest")
    with pytest.raises(arrival.errors.InvalidQueueSpec, match="drop must be"):
        broker.create_queue("q2", "at-most-once", drop="middle")


def test_acks_of_at_most_once_messages_never_reach_the_broker(
    broker: arrival.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # handed out is processed: an ack has nothing to tell the broker, so it costs no
    # request (against a server, no round trip per batch)
    broker.create_queue("q", "at-most-once")
    broker.producer().send_batch("q", [b"x", b"y", b"z"])
    c = broker.consumer("q", "g")
    msgs = c.receive_batch(10, timeout=0)
    assert len(msgs) == 3

    def no_ack(*args: object) -> None:
        raise AssertionError("an at-most-once ack reached the backend")

    monkeypatch.setattr(c._b, "ack", no_ack)
    c.ack_batch(msgs)
    msgs[0].ack()
    c.ack_batch([])
