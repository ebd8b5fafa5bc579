"""at-least-once: durable sends, leases, retries, per-key order, groups, restarts."""

from __future__ import annotations

import threading
import time

import pytest

import arrival
from arrival.errors import AlreadySettled, ClosedError, LeaseExpired
from arrival.testing import FakeClock
from conftest import NO_BACKOFF, Stores, engine_of
from conftest import bodies as _bodies
from conftest import drain as _drain


def _group(broker: arrival.Broker, queue: str, group: str) -> arrival.GroupStats:
    (g,) = [g for g in broker.stats(queue).groups if g.group == group]
    return g


# -- sending ---------------------------------------------------------------------------


def test_send_returns_consecutive_offsets_and_message_fields(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    p = broker.producer()
    assert p.send("q", b"a", key="k", headers={"type": "order"}, id="m-1") == 0
    assert p.send("q", b"b") == 1
    c = broker.consumer("q", "g")
    m1, m2 = c.receive_batch(10, timeout=0)
    assert (m1.body, m1.key, m1.headers, m1.id, m1.attempt) == (
        b"a",
        "k",
        {"type": "order"},
        "m-1",
        1,
    )
    assert (m1.offset, m1.redelivered, m1.lease_lost) == (0, False, False)
    assert (m2.body, m2.key, m2.headers, m2.id, m2.offset) == (b"b", None, {}, "q:1", 1)
    assert m1.timestamp == engine_of(broker).clock.now()


def test_send_batch_with_envelopes_keeps_fields_and_order(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    p = broker.producer()
    p.send("q", b"before")
    first = p.send_batch(
        "q",
        [
            arrival.Envelope(b"e0", key="k0", headers={"h": "0"}, id="id-0"),
            b"plain",
            arrival.Envelope(b"e2", key="k2", id="id-2"),
            arrival.Envelope(b"e3", headers={"h": "3"}),
        ],
    )
    assert first == 1
    assert p.send("q", b"after") == 5
    got = _drain(broker.consumer("q", "g"))
    assert [(m.offset, m.body, m.key, m.headers, m.id) for m in got] == [
        (0, b"before", None, {}, "q:0"),
        (1, b"e0", "k0", {"h": "0"}, "id-0"),
        (2, b"plain", None, {}, "q:2"),
        (3, b"e2", "k2", {}, "id-2"),
        (4, b"e3", None, {"h": "3"}, "q:4"),
        (5, b"after", None, {}, "q:5"),
    ]


def test_concurrent_sends_from_threads_all_land(stores: Stores) -> None:
    broker = stores.open()
    broker.create_queue("q", "at-least-once")
    threads_n, per_thread = 8, 50
    offsets: dict[int, list[int]] = {t: [] for t in range(threads_n)}
    syncs_before = engine_of(broker).storage.syncs
    barrier = threading.Barrier(threads_n)

    def produce(t: int) -> None:
        p = broker.producer()
        barrier.wait()
        for i in range(per_thread):
            off = p.send("q", f"{t}:{i}".encode())
            assert off is not None
            offsets[t].append(off)

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    total = threads_n * per_thread
    syncs = engine_of(broker).storage.syncs - syncs_before
    every = [o for offs in offsets.values() for o in offs]
    assert sorted(every) == list(range(total))  # distinct, no holes
    for offs in offsets.values():
        assert offs == sorted(offs)  # each thread's sends in its order
    if stores.kind == "sqlite":
        assert syncs < total  # concurrent sends shared fsyncs (group commit)
    got = broker.consumer("q", "g").receive_batch(total + 10, timeout=0)
    by_offset = {m.offset: m.body for m in got}
    assert len(got) == total
    for t, offs in offsets.items():
        assert [by_offset[o] for o in offs] == [f"{t}:{i}".encode() for i in range(per_thread)]


# -- groups ----------------------------------------------------------------------------


def test_every_group_gets_every_message(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    a = broker.consumer("q", "a")
    b = broker.consumer("q", "b")
    for i in range(5):
        broker.producer().send("q", b"%d" % i)
    assert _bodies(_drain(a)) == [b"0", b"1", b"2", b"3", b"4"]
    assert _bodies(_drain(b)) == [b"0", b"1", b"2", b"3", b"4"]
    assert a.receive(timeout=0) is None


def test_members_of_a_group_share_messages(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    c1 = broker.consumer("q", "g")
    c2 = broker.consumer("q", "g")
    broker.producer().send_batch("q", [b"%d" % i for i in range(6)])
    first = c1.receive_batch(3, timeout=0)
    second = c2.receive_batch(10, timeout=0)
    assert len(first) == 3
    assert len(second) == 3
    assert {m.offset for m in first}.isdisjoint({m.offset for m in second})
    assert {m.offset for m in first} | {m.offset for m in second} == set(range(6))
    # while leased, no member gets any of them again
    assert c1.receive(timeout=0) is None
    assert c2.receive(timeout=0) is None
    assert _group(broker, "q", "g").in_flight == 6


def test_late_group_starts_at_oldest_retained_message(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    for i in range(3):
        broker.producer().send("q", b"%d" % i)
    late = broker.consumer("q", "late")
    assert _bodies(_drain(late)) == [b"0", b"1", b"2"]


def test_start_latest_skips_earlier_messages(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once", retention=3600.0)
    p = broker.producer()
    p.send("q", b"old-1")
    p.send("q", b"old-2")
    c = broker.consumer("q", "g", start="latest")
    assert c.receive(timeout=0) is None
    p.send("q", b"new")
    assert _bodies(_drain(c)) == [b"new"]
    # an earliest group on the same queue still gets all three (retained for an hour)
    assert _bodies(_drain(broker.consumer("q", "other"))) == [b"old-1", b"old-2", b"new"]


def test_start_must_be_earliest_or_latest(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    with pytest.raises(arrival.errors.UsageError, match="earliest"):
        broker.consumer("q", "g", start="middle")


def test_receive_returns_none_when_empty(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    c = broker.consumer("q", "g")
    assert c.receive(timeout=0) is None
    t0 = time.monotonic()
    assert c.receive(timeout=0.05) is None
    assert time.monotonic() - t0 >= 0.04
    assert c.receive_batch(5, timeout=0) == []


def test_receive_wakes_up_when_a_message_is_sent(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    c = broker.consumer("q", "g")
    got: list[arrival.Message | None] = []
    th = threading.Thread(target=lambda: got.append(c.receive(timeout=10)))
    th.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    broker.producer().send("q", b"wake")
    th.join(5)
    assert not th.is_alive()
    assert time.monotonic() - t0 < 2
    assert got[0] is not None
    assert got[0].body == b"wake"


# -- leases ----------------------------------------------------------------------------


def test_ack_after_lease_expired_raises(broker: arrival.Broker, clock: FakeClock) -> None:
    broker.create_queue("q", "at-least-once", ack_timeout=10.0, backoff=NO_BACKOFF)
    broker.producer().send("q", b"x")
    c = broker.consumer("q", "g")
    msg = c.receive(timeout=0)
    assert msg is not None
    assert msg.lease_deadline == clock.now() + 10.0
    clock.advance(9.0)
    assert msg.lease_lost is False
    clock.advance(1.5)
    assert msg.lease_lost is True
    with pytest.raises(LeaseExpired) as info:
        msg.ack()
    assert (info.value.offset, info.value.attempt) == (0, 1)
    assert "extend()" in str(info.value)
    again = c.receive(timeout=0)  # redelivered after the expiry
    assert again is not None
    assert (again.offset, again.attempt) == (0, 2)
    with pytest.raises(LeaseExpired):
        msg.nack()  # the stale receipt stays refused
    again.ack()
    assert _group(broker, "q", "g").acked == 1


def test_expired_message_goes_to_another_member(broker: arrival.Broker, clock: FakeClock) -> None:
    broker.create_queue("q", "at-least-once", ack_timeout=5.0, backoff=NO_BACKOFF)
    broker.producer().send("q", b"x")
    c1 = broker.consumer("q", "g")
    c2 = broker.consumer("q", "g")
    first = c1.receive(timeout=0)
    assert first is not None
    assert c2.receive(timeout=0) is None
    clock.advance(6.0)
    second = c2.receive(timeout=0)
    assert second is not None
    assert (second.offset, second.attempt) == (0, 2)
    assert second.redelivered
    assert first.lease_lost
    assert not second.lease_lost
    with pytest.raises(LeaseExpired):
        first.ack()
    second.ack()


def test_extend_keeps_the_lease(broker: arrival.Broker, clock: FakeClock) -> None:
    broker.create_queue("q", "at-least-once", ack_timeout=10.0, backoff=NO_BACKOFF)
    broker.producer().send("q", b"x")
    c = broker.consumer("q", "g")
    other = broker.consumer("q", "g")
    msg = c.receive(timeout=0)
    assert msg is not None
    clock.advance(8.0)
    msg.extend()
    assert msg.lease_deadline == clock.now() + 10.0
    clock.advance(8.0)  # 16 s after delivery: past the original deadline
    assert msg.lease_lost is False
    assert other.receive(timeout=0) is None
    msg.extend(30.0)
    clock.advance(25.0)
    assert other.receive(timeout=0) is None
    msg.ack()
    with pytest.raises(AlreadySettled):
        msg.extend()
    g = _group(broker, "q", "g")
    assert (g.acked, g.expired, g.delivered) == (1, 0, 1)


def test_extend_after_expiry_is_refused(broker: arrival.Broker, clock: FakeClock) -> None:
    broker.create_queue("q", "at-least-once", ack_timeout=10.0)
    broker.producer().send("q", b"x")
    msg = broker.consumer("q", "g").receive(timeout=0)
    assert msg is not None
    clock.advance(10.5)
    with pytest.raises(LeaseExpired):
        msg.extend()
    assert msg.lease_lost


def test_nack_with_delay(broker: arrival.Broker, clock: FakeClock) -> None:
    broker.create_queue("q", "at-least-once")
    broker.producer().send("q", b"x")
    c = broker.consumer("q", "g")
    msg = c.receive(timeout=0)
    assert msg is not None
    msg.nack(delay=5)
    assert c.receive(timeout=0) is None
    clock.advance(4.9)
    assert c.receive(timeout=0) is None
    clock.advance(0.2)
    again = c.receive(timeout=0)
    assert again is not None
    assert (again.offset, again.body, again.attempt, again.redelivered) == (0, b"x", 2, True)
    with pytest.raises(LeaseExpired):
        msg.ack()  # the nacked delivery can't be settled again
    again.ack()
    with pytest.raises(AlreadySettled):
        again.ack()


def test_nack_without_delay_uses_backoff(broker: arrival.Broker, clock: FakeClock) -> None:
    backoff = arrival.Backoff(initial_s=2.0, multiplier=2.0, max_s=10.0, jitter=0.5)
    broker.create_queue("q", "at-least-once", backoff=backoff, max_deliveries=None)
    broker.producer().send("q", b"x")
    c = broker.consumer("q", "g")
    for attempt in (1, 2, 3):
        msg = c.receive(timeout=0)
        assert msg is not None
        assert msg.attempt == attempt
        msg.nack()
        # the backoff is at least initial_s * (1 - jitter) = 1 s: not redelivered at once
        assert c.receive(timeout=0) is None
        clock.advance(0.9)
        assert c.receive(timeout=0) is None
        clock.advance(backoff.max_s)
    last = c.receive(timeout=0)
    assert last is not None
    assert last.attempt == 4
    last.ack()
    assert _group(broker, "q", "g").nacked == 3


def test_nack_zero_delay_redelivers_at_once(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    broker.producer().send("q", b"x")
    c = broker.consumer("q", "g")
    msg = c.receive(timeout=0)
    assert msg is not None
    msg.nack(delay=0, error="flaky")
    again = c.receive(timeout=0)
    assert again is not None
    assert again.attempt == 2


def test_release_does_not_spend_an_attempt(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    broker.producer().send("q", b"x")
    c = broker.consumer("q", "g")
    for _ in range(3):
        msg = c.receive(timeout=0)
        assert msg is not None
        msg.release()
    msg = c.receive(timeout=0)
    assert msg is not None
    msg.ack()
    assert broker.dead_letters("q").list() == []


def test_ack_batch(broker: arrival.Broker, clock: FakeClock) -> None:
    broker.create_queue("q", "at-least-once", ack_timeout=5.0, backoff=NO_BACKOFF)
    broker.producer().send_batch("q", [b"0", b"1", b"2", b"3"])
    c = broker.consumer("q", "g")
    msgs = c.receive_batch(3, timeout=0)
    assert [m.offset for m in msgs] == [0, 1, 2]
    c.ack_batch(msgs)
    g = _group(broker, "q", "g")
    assert (g.acked, g.in_flight, g.backlog) == (3, 0, 1)
    clock.advance(60.0)
    rest = _drain(c)
    assert [m.offset for m in rest] == [3]  # the acked ones never come back
    c.ack_batch([])  # nothing to do


# -- per-key order ---------------------------------------------------------------------


def test_per_key_one_in_flight_and_send_order(broker: arrival.Broker, clock: FakeClock) -> None:
    broker.create_queue("q", "at-least-once")
    sends = [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("c", 1), ("b", 3), ("a", 4)]
    broker.producer().send_batch(
        "q", [arrival.Envelope(f"{k}{i}".encode(), key=k) for k, i in sends]
    )
    c1 = broker.consumer("q", "g")
    c2 = broker.consumer("q", "g")
    delivered: dict[str, list[bytes]] = {"a": [], "b": [], "c": []}
    in_flight: dict[str, arrival.Message] = {}
    rounds = 0
    while sum(len(v) for v in delivered.values()) < len(sends):
        rounds += 1
        assert rounds < 50
        for c in (c1, c2):
            for m in c.receive_batch(10, timeout=0):
                assert m.key is not None
                assert m.key not in in_flight, f"two messages of key {m.key} in flight"
                in_flight[m.key] = m
        # different keys are in flight at once
        if rounds == 1:
            assert sorted(in_flight) == ["a", "b", "c"]
            assert [in_flight[k].body for k in "abc"] == [b"a1", b"b1", b"c1"]
        # settle: nack the head of key "a" once, ack the rest
        for key, m in list(in_flight.items()):
            if m.body == b"a2" and m.attempt == 1:
                m.nack(delay=3)
                del in_flight[key]
                continue
            m.ack()
            delivered[key].append(m.body)
            del in_flight[key]
        clock.advance(1.0)
    assert delivered == {
        "a": [b"a1", b"a2", b"a3", b"a4"],
        "b": [b"b1", b"b2", b"b3"],
        "c": [b"c1"],
    }


def test_nacked_head_blocks_its_key_only(broker: arrival.Broker, clock: FakeClock) -> None:
    broker.create_queue("q", "at-least-once")
    p = broker.producer()
    p.send("q", b"a1", key="a")
    p.send("q", b"a2", key="a")
    p.send("q", b"b1", key="b")
    p.send("q", b"free")
    c = broker.consumer("q", "g")
    head = c.receive(timeout=0)
    assert head is not None
    assert head.body == b"a1"
    head.nack()  # default backoff
    # a2 waits for a1; other keys and unkeyed messages go on
    assert _bodies(_drain(c)) == [b"b1", b"free"]
    clock.advance(arrival.Backoff().max_s)
    retry = c.receive(timeout=0)
    assert retry is not None
    assert (retry.body, retry.attempt) == (b"a1", 2)
    assert c.receive(timeout=0) is None  # a2 still waits while a1 is leased
    retry.ack()
    nxt = c.receive(timeout=0)
    assert nxt is not None
    assert (nxt.body, nxt.attempt) == (b"a2", 1)


def test_unkeyed_messages_in_parallel(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    broker.producer().send_batch("q", [b"%d" % i for i in range(5)])
    got = broker.consumer("q", "g").receive_batch(10, timeout=0)
    assert [m.offset for m in got] == [0, 1, 2, 3, 4]


# -- consumers closing -----------------------------------------------------------------


def test_consumer_close_releases_without_spending_attempts(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    broker.producer().send_batch("q", [b"0", b"1"])
    c = broker.consumer("q", "g")
    held = c.receive_batch(2, timeout=0)
    assert len(held) == 2
    c.close()
    assert held[0].lease_lost
    with pytest.raises(LeaseExpired):
        held[0].ack()
    with pytest.raises(ClosedError):
        c.receive(timeout=0)
    c2 = broker.consumer("q", "g")
    again = c2.receive_batch(10, timeout=0)
    assert [m.offset for m in again] == [0, 1]
    assert broker.dead_letters("q").list() == []  # max_deliveries=1 did not dead-letter
    g = _group(broker, "q", "g")
    assert (g.dead_lettered, g.nacked, g.expired) == (0, 0, 0)
    c2.ack_batch(again)


def test_iteration_stops_when_consumer_closed_from_another_thread(
    broker: arrival.Broker,
) -> None:
    broker.create_queue("q", "at-least-once")
    c = broker.consumer("q", "g")
    seen: list[bytes] = []
    got_three = threading.Event()

    def run() -> None:
        for msg in c:
            seen.append(msg.body)
            msg.ack()
            if len(seen) == 3:
                got_three.set()

    th = threading.Thread(target=run)
    th.start()
    for i in range(3):
        broker.producer().send("q", b"%d" % i)
    assert got_three.wait(5)
    c.close()
    th.join(5)
    assert not th.is_alive()
    assert seen == [b"0", b"1", b"2"]


def test_iteration_stops_when_broker_closes(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    broker.producer().send("q", b"only")
    c = broker.consumer("q", "g")
    seen: list[bytes] = []

    def run() -> None:
        for msg in c:
            seen.append(msg.body)

    th = threading.Thread(target=run)
    th.start()
    time.sleep(0.05)
    broker.close()
    th.join(5)
    assert not th.is_alive()
    assert seen == [b"only"]


def test_close_wakes_a_blocked_receive(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    c = broker.consumer("q", "g")
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(c.receive())
        except ClosedError as exc:
            outcome.append(exc)

    th = threading.Thread(target=run)
    th.start()
    time.sleep(0.05)
    c.close()
    th.join(1.0)
    stuck = th.is_alive()
    if stuck:
        broker.close()  # wakes it, so the thread does not outlive the test
        th.join(5)
    assert not stuck
    assert len(outcome) == 1
    assert outcome[0] is None or isinstance(outcome[0], ClosedError)


# -- restarts --------------------------------------------------------------------------


def test_reopen_redelivers_exactly_the_unacked(stores: Stores) -> None:
    b1 = stores.open()
    b1.create_queue("q", "at-least-once")
    b1.producer().send_batch("q", [b"%d" % i for i in range(6)])
    c = b1.consumer("q", "g")
    held = c.receive_batch(5, timeout=0)
    assert [m.offset for m in held] == [0, 1, 2, 3, 4]
    for m in held:
        if m.offset % 2 == 0:
            m.ack()
    b1.close()
    assert held[1].lease_lost

    b2 = stores.open()
    c2 = b2.consumer("q", "g")
    got = c2.receive_batch(10, timeout=0)
    assert [(m.offset, m.attempt) for m in got] == [(1, 2), (3, 2), (5, 1)]
    assert _bodies(got) == [b"1", b"3", b"5"]
    c2.ack_batch(got)
    assert c2.receive(timeout=0) is None
    # and another group that never consumed still gets everything
    assert len(_drain(b2.consumer("q", "fresh"))) == 6
    b2.close()

    b3 = stores.open()
    assert b3.consumer("q", "g").receive(timeout=0) is None  # every ack survived


def test_reopen_then_one_by_one_never_redelivers_acked(stores: Stores) -> None:
    b1 = stores.open()
    b1.create_queue("q", "at-least-once")
    b1.producer().send_batch("q", [b"0", b"1", b"2"])
    held = b1.consumer("q", "g").receive_batch(3, timeout=0)
    held[1].ack()  # 0 and 2 stay unacked
    b1.close()

    b2 = stores.open()
    c = b2.consumer("q", "g")
    got = _drain(c)  # receive one, ack it, receive the next...
    assert [(m.offset, m.attempt) for m in got] == [(0, 2), (2, 2)]


def test_receipt_from_before_a_restart_is_refused(stores: Stores) -> None:
    b1 = stores.open()
    b1.create_queue("q", "at-least-once")
    b1.producer().send("q", b"x")
    msg = b1.consumer("q", "g").receive(timeout=0)
    assert msg is not None
    b1.close()
    b2 = stores.open()
    with pytest.raises(ClosedError):
        msg.ack()  # through the closed broker: refused, not silently lost
    assert msg.lease_lost
    again = b2.consumer("q", "g").receive(timeout=0)
    assert again is not None
    assert again.attempt == 2
    again.ack()


def test_retry_state_survives_reopen(stores: Stores, clock: FakeClock) -> None:
    b1 = stores.open()
    b1.create_queue("q", "at-least-once", max_deliveries=3)
    b1.producer().send_batch(
        "q", [arrival.Envelope(b"a1", key="a"), arrival.Envelope(b"a2", key="a")]
    )
    msg = b1.consumer("q", "g").receive(timeout=0)
    assert msg is not None
    assert msg.body == b"a1"
    msg.nack(delay=100, error="first")
    b1.close()

    b2 = stores.open()
    c = b2.consumer("q", "g")
    assert c.receive(timeout=0) is None  # the delay survived, and a2 waits behind a1
    clock.advance(101.0)
    again = c.receive(timeout=0)
    assert again is not None
    assert (again.body, again.attempt) == (b"a1", 2)
    again.nack(delay=0, error="second")
    third = c.receive(timeout=0)
    assert third is not None
    assert third.attempt == 3
    third.nack(delay=0, error="third")  # the third failure in all: dead-lettered
    (d,) = b2.dead_letters("q").list()
    assert (d.body, d.attempts, d.last_error) == (b"a1", 3, "third")
    assert d.first_failure == clock.now() - 101.0  # the failure from before the reopen
    nxt = c.receive(timeout=0)
    assert nxt is not None
    assert (nxt.body, nxt.attempt) == (b"a2", 1)


def test_crash_after_sends_returned_loses_nothing(stores: Stores) -> None:
    b1 = stores.open()
    b1.create_queue("q", "at-least-once")
    p = b1.producer()
    offsets = [p.send("q", b"%d" % i, key=f"k{i % 3}") for i in range(20)]
    offsets.append(p.send_batch("q", [b"20", b"21"]))
    assert offsets[-1] == 20
    stores.crash(b1)

    b2 = stores.open()
    got = _drain(b2.consumer("q", "g"))
    assert _bodies(got) == [b"%d" % i for i in range(22)]
    assert [m.key for m in got[:20]] == [f"k{i % 3}" for i in range(20)]


def test_crash_with_unacked_messages_redelivers_them(stores: Stores) -> None:
    b1 = stores.open()
    b1.create_queue("q", "at-least-once")
    b1.producer().send_batch("q", [b"0", b"1", b"2"])
    c = b1.consumer("q", "g")
    msgs = c.receive_batch(3, timeout=0)
    msgs[0].ack()
    b1.dead_letters("q").list()  # flushes: the ack of 0 is durable
    stores.crash(b1)

    b2 = stores.open()
    got = _drain(b2.consumer("q", "g"))
    assert _bodies(got) == [b"1", b"2"]  # nothing lost; the acked one not redelivered


# -- stats -----------------------------------------------------------------------------


def test_stats_counters(broker: arrival.Broker, clock: FakeClock) -> None:
    broker.create_queue(
        "q", "at-least-once", ack_timeout=10.0, max_deliveries=3, backoff=NO_BACKOFF
    )
    broker.producer().send_batch("q", [b"%d" % i for i in range(5)])
    st = broker.stats("q")
    assert (st.name, st.guarantee, st.sent, st.end_offset, st.stored) == (
        "q",
        arrival.Guarantee.AT_LEAST_ONCE,
        5,
        5,
        5,
    )
    assert st.groups == ()
    c = broker.consumer("q", "g")
    m0, m1, m2, _m3, _m4 = c.receive_batch(5, timeout=0)
    g = _group(broker, "q", "g")
    assert (g.backlog, g.in_flight, g.delivered, g.acked) == (5, 5, 5, 0)
    m0.ack()
    m1.nack(delay=0)
    m2.reject("bad")
    g = _group(broker, "q", "g")
    assert (g.backlog, g.in_flight, g.acked, g.nacked, g.dead_lettered) == (3, 2, 1, 1, 1)
    clock.advance(11.0)  # m3 and m4 expire
    again = c.receive_batch(10, timeout=0)
    assert sorted((m.offset, m.attempt) for m in again) == [(1, 2), (3, 2), (4, 2)]
    g = _group(broker, "q", "g")
    assert (g.delivered, g.redelivered, g.expired, g.in_flight) == (8, 3, 2, 3)
    c.ack_batch(again)
    g = _group(broker, "q", "g")
    assert (g.backlog, g.in_flight, g.acked, g.waiting_retry) == (0, 0, 4, 0)
    assert [d.body for d in broker.dead_letters("q").list()] == [b"2"]
