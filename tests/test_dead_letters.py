"""Dead letters: provenance, reject, lease expiry budget, replay, purge, persistence."""

from __future__ import annotations

import pytest

import arrival
from arrival.errors import NotSupported
from arrival.testing import FakeClock
from conftest import NO_BACKOFF, Stores
from conftest import drain as _drain


def _fail_until_dead(
    c: arrival.Consumer, clock: FakeClock, times: int, error: str = "boom"
) -> list[float]:
    """Receive the one message and nack it ``times`` times, 1 s apart; the nack times."""
    when: list[float] = []
    for attempt in range(1, times + 1):
        msg = c.receive(timeout=0)
        assert msg is not None
        assert msg.attempt == attempt
        when.append(clock.now())
        msg.nack(delay=0, error=f"{error} {attempt}")
        clock.advance(1.0)
    return when


def test_max_deliveries_moves_message_to_dlq_with_provenance(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=3)
    broker.producer().send("q", b"payload", key="k7", headers={"type": "order"}, id="m-1")
    c = broker.consumer("q", "billing")
    assert broker.dead_letters("q").list() == []
    when = _fail_until_dead(c, clock, 3)
    assert c.receive(timeout=0) is None  # not redelivered after the last attempt
    (d,) = broker.dead_letters("q").list()
    assert (d.id, d.key, d.body) == ("m-1", "k7", b"payload")
    assert (d.origin_queue, d.origin_group, d.attempts) == ("q", "billing", 3)
    assert d.first_failure == when[0]
    assert d.last_failure == when[2]
    assert d.last_error == "boom 3"
    assert d.reason is not None
    assert "max_deliveries=3" in d.reason
    assert d.headers["type"] == "order"  # the producer's headers are kept
    assert d.headers["arrival-origin-queue"] == "q"
    assert d.headers["arrival-attempts"] == "3"
    g = broker.stats("q").groups[0]
    assert (g.dead_lettered, g.nacked, g.backlog, g.in_flight) == (1, 3, 0, 0)


def test_message_without_id_keeps_a_traceable_id(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    broker.producer().send_batch("q", [b"first", b"second"])
    c = broker.consumer("q", "g")
    first = c.receive(timeout=0)
    second = c.receive(timeout=0)
    assert first is not None
    assert second is not None
    first.ack()
    second.reject("unparseable")
    (d,) = broker.dead_letters("q").list()
    assert d.id == second.id == "q:1"


def test_reject_dead_letters_at_once_with_reason(broker: arrival.Broker, clock: FakeClock) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=10)
    broker.producer().send("q", b"bad json", id="m-9")
    c = broker.consumer("q", "g")
    msg = c.receive(timeout=0)
    assert msg is not None
    msg.reject("invalid JSON")
    assert c.receive(timeout=0) is None
    clock.advance(3600.0)
    assert c.receive(timeout=0) is None
    (d,) = broker.dead_letters("q").list()
    assert d.reason is not None
    assert "invalid JSON" in d.reason
    assert (d.id, d.body, d.attempts, d.origin_group) == ("m-9", b"bad json", 1, "g")
    assert d.last_error == "invalid JSON"
    assert d.first_failure == d.last_failure == clock.now() - 3600.0


def test_lease_expiry_counts_toward_max_deliveries(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    broker.create_queue(
        "q", "at-least-once", max_deliveries=2, ack_timeout=10.0, backoff=NO_BACKOFF
    )
    broker.producer().send("q", b"slow")
    c = broker.consumer("q", "g")
    first = c.receive(timeout=0)
    assert first is not None
    assert first.attempt == 1
    clock.advance(11.0)
    second = c.receive(timeout=0)
    assert second is not None
    assert second.attempt == 2
    clock.advance(11.0)
    assert c.receive(timeout=0) is None  # the second expiry used up the budget
    (d,) = broker.dead_letters("q").list()
    assert (d.body, d.attempts) == (b"slow", 2)
    assert d.last_error is not None
    assert "lease expired" in d.last_error
    g = broker.stats("q").groups[0]
    assert (g.expired, g.dead_lettered) == (2, 1)


def test_mixed_nack_and_expiry_share_the_budget(broker: arrival.Broker, clock: FakeClock) -> None:
    broker.create_queue(
        "q", "at-least-once", max_deliveries=2, ack_timeout=10.0, backoff=NO_BACKOFF
    )
    broker.producer().send("q", b"x")
    c = broker.consumer("q", "g")
    msg = c.receive(timeout=0)
    assert msg is not None
    msg.nack(delay=0)
    assert c.receive(timeout=0) is not None
    clock.advance(11.0)
    assert c.receive(timeout=0) is None
    assert len(broker.dead_letters("q").list()) == 1


def test_replay_goes_only_to_origin_group(broker: arrival.Broker, clock: FakeClock) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=2, retention=3600.0)
    broker.producer().send("q", b"p", key="k", headers={"type": "t"}, id="m-1")
    ok = broker.consumer("q", "ok")
    failing = broker.consumer("q", "failing")
    assert [m.body for m in _drain(ok)] == [b"p"]
    _fail_until_dead(failing, clock, 2)
    dlq = broker.dead_letters("q")
    assert len(dlq.list()) == 1

    replayed = dlq.replay()
    assert [(d.id, d.origin_group) for d in replayed] == [("m-1", "failing")]
    assert dlq.list() == []  # removed from the DLQ
    msg = failing.receive(timeout=0)
    assert msg is not None
    assert (msg.id, msg.key, msg.body, msg.attempt) == ("m-1", "k", b"p", 1)
    assert msg.headers["arrival-replays"] == "1"
    assert msg.headers["type"] == "t"
    assert "arrival-origin-queue" not in msg.headers
    msg.ack()
    # the group that acked it does not get it again; a group created later gets the
    # original (retained for an hour) once, not the replayed copy as well
    assert ok.receive(timeout=0) is None
    assert [m.body for m in _drain(broker.consumer("q", "late"))] == [b"p"]
    assert failing.receive(timeout=0) is None


def test_replayed_message_has_a_fresh_budget_and_counts_replays(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=2)
    broker.producer().send("q", b"x", id="m-1")
    c = broker.consumer("q", "g")
    _fail_until_dead(c, clock, 2)
    broker.dead_letters("q").replay()
    _fail_until_dead(c, clock, 2)  # two more attempts, numbered from 1 again
    (d,) = broker.dead_letters("q").list()
    assert d.attempts == 2
    assert d.headers["arrival-replays"] == "1"
    broker.dead_letters("q").replay()
    msg = c.receive(timeout=0)
    assert msg is not None
    assert msg.headers["arrival-replays"] == "2"
    msg.ack()


def test_replay_where_filters(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    broker.producer().send_batch(
        "q", [arrival.Envelope(b"%d" % i, key=f"k{i}", id=f"m-{i}") for i in range(4)]
    )
    c = broker.consumer("q", "g")
    for msg in c.receive_batch(4, timeout=0):
        msg.reject("even" if int(msg.body) % 2 == 0 else "odd")
    dlq = broker.dead_letters("q")
    chosen = dlq.replay(where=lambda d: d.reason is not None and "even" in d.reason)
    assert sorted(d.id for d in chosen if d.id) == ["m-0", "m-2"]
    assert sorted(d.id for d in dlq.list() if d.id) == ["m-1", "m-3"]
    assert sorted(m.id for m in _drain(c)) == ["m-0", "m-2"]
    limited = dlq.replay(limit=1)
    assert len(limited) == 1
    assert len(dlq.list()) == 1


def test_replay_dry_run_changes_nothing(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    broker.producer().send_batch("q", [b"a", b"b"])
    c = broker.consumer("q", "g")
    for msg in c.receive_batch(2, timeout=0):
        msg.reject("no")
    dlq = broker.dead_letters("q")
    before = dlq.list()
    end_before = broker.stats("q").end_offset
    would = dlq.replay(dry_run=True)
    assert [d.body for d in would] == [b"a", b"b"]
    assert dlq.list() == before
    assert broker.stats("q").end_offset == end_before
    assert c.receive(timeout=0) is None


def test_purge_empties_and_counts(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    broker.producer().send_batch("q", [b"a", b"b", b"c"])
    c = broker.consumer("q", "g")
    for msg in c.receive_batch(3, timeout=0):
        msg.reject("no")
    dlq = broker.dead_letters("q")
    assert dlq.purge() == 3
    assert dlq.list() == []
    assert dlq.purge() == 0
    assert dlq.replay() == []
    assert c.receive(timeout=0) is None


def test_purge_where(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    broker.producer().send_batch("q", [b"a", b"b", b"c"])
    c = broker.consumer("q", "g")
    for msg in c.receive_batch(3, timeout=0):
        msg.reject("no")
    dlq = broker.dead_letters("q")
    assert dlq.purge(where=lambda d: d.body != b"b") == 2
    assert [d.body for d in dlq.list()] == [b"b"]


def test_list_limit(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    broker.producer().send_batch("q", [b"a", b"b", b"c"])
    for msg in broker.consumer("q", "g").receive_batch(3, timeout=0):
        msg.reject("no")
    assert [d.body for d in broker.dead_letters("q").list(limit=2)] == [b"a", b"b"]


def test_dead_letters_survive_reopen(stores: Stores, clock: FakeClock) -> None:
    b1 = stores.open()
    b1.create_queue("q", "at-least-once", max_deliveries=1)
    b1.producer().send_batch("q", [b"a", b"b", b"c"])
    c = b1.consumer("q", "g")
    a, b, cc = c.receive_batch(3, timeout=0)
    a.nack(error="db down")
    b.reject("bad")
    cc.ack()
    before = b1.dead_letters("q").list()
    assert [d.body for d in before] == [b"a", b"b"]
    b1.close()

    b2 = stores.open()
    after = b2.dead_letters("q").list()
    assert after == before
    assert after[0].last_error == "db down"
    assert b2.consumer("q", "g").receive(timeout=0) is None  # not back in the queue
    b2.dead_letters("q").purge(where=lambda d: d.body == b"b")
    b2.close()

    b3 = stores.open()
    assert [d.body for d in b3.dead_letters("q").list()] == [b"a"]  # the purge survived
    b3.dead_letters("q").replay()
    b3.close()

    b4 = stores.open()
    assert b4.dead_letters("q").list() == []  # the replay survived
    msg = b4.consumer("q", "g").receive(timeout=0)
    assert msg is not None
    assert (msg.body, msg.attempt) == (b"a", 1)
    msg.ack()


def test_dead_letters_survive_a_crash(stores: Stores) -> None:
    b1 = stores.open()
    b1.create_queue("q", "at-least-once")
    b1.producer().send("q", b"x")
    msg = b1.consumer("q", "g").receive(timeout=0)
    assert msg is not None
    msg.reject("bad")
    assert len(b1.dead_letters("q").list()) == 1  # list() waits for the commit
    stores.crash(b1)
    b2 = stores.open()
    (d,) = b2.dead_letters("q").list()
    assert (d.body, d.origin_group) == (b"x", "g")
    assert b2.consumer("q", "g").receive(timeout=0) is None


def test_queue_without_dlq_cannot_reject(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once", dead_letter=None, max_deliveries=None)
    broker.producer().send("q", b"x")
    c = broker.consumer("q", "g")
    msg = c.receive(timeout=0)
    assert msg is not None
    with pytest.raises(NotSupported, match="no dead-letter queue") as info:
        msg.reject("bad")
    assert "nack" in str(info.value)  # says what to do instead
    with pytest.raises(NotSupported, match="no dead-letter queue"):
        broker.dead_letters("q").list()
    # the message is still leased and can be settled normally
    msg.ack()
    assert c.receive(timeout=0) is None


def test_unlimited_retries_never_dead_letter(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=None)
    broker.producer().send("q", b"x")
    c = broker.consumer("q", "g")
    for attempt in range(1, 21):
        msg = c.receive(timeout=0)
        assert msg is not None
        assert msg.attempt == attempt
        msg.nack(delay=0)
    assert broker.dead_letters("q").list() == []


def test_dead_lettered_head_unblocks_its_key(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once", max_deliveries=1)
    broker.producer().send_batch(
        "q", [arrival.Envelope(b"a1", key="a"), arrival.Envelope(b"a2", key="a")]
    )
    c = broker.consumer("q", "g")
    head = c.receive(timeout=0)
    assert head is not None
    assert head.body == b"a1"
    assert c.receive(timeout=0) is None
    head.nack(delay=0)  # the only attempt: dead-lettered
    nxt = c.receive(timeout=0)
    assert nxt is not None
    assert (nxt.body, nxt.attempt) == (b"a2", 1)
    assert [d.body for d in broker.dead_letters("q").list()] == [b"a1"]


def test_replay_target_survives_reopen(stores: Stores, clock: FakeClock) -> None:
    b1 = stores.open()
    b1.create_queue("q", "at-least-once", max_deliveries=1)
    b1.producer().send("q", b"x")
    assert [m.body for m in _drain(b1.consumer("q", "ok"))] == [b"x"]
    _fail_until_dead(b1.consumer("q", "failing"), clock, 1)
    assert len(b1.dead_letters("q").replay()) == 1
    b1.close()

    b2 = stores.open()
    assert b2.consumer("q", "ok").receive(timeout=0) is None
    msg = b2.consumer("q", "failing").receive(timeout=0)
    assert msg is not None
    assert (msg.body, msg.attempt) == (b"x", 1)
    assert msg.headers["arrival-replays"] == "1"
    msg.ack()
