"""Transactions: sends and acks across queues take effect together at commit, or not at all.

Covers SPEC §1 exactly-once: atomic commit (read_committed only), abort on exception,
crash and timeout, zombie fencing, refused stale acks, deterministic output ids, and the
limits checked at send time. The async twin is exercised at the end of the file.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

import arrival
import arrival._common
import arrival.aio
import arrival.engine
from arrival.errors import (
    AlreadySettled,
    BrokerUnreachable,
    ClosedError,
    LeaseExpired,
    MessageTooLarge,
    ProducerFenced,
    StorageError,
    TransactionError,
    TransactionTimedOut,
    UnknownQueue,
    UsageError,
)
from arrival.storage.base import WriteSet
from arrival.testing import FakeClock
from conftest import NO_BACKOFF, Stores, bodies, drain, engine_of

T = TypeVar("T")

ACK_TIMEOUT_S = 10.0
OUT_QUEUES = ("eo", "alo", "amo")  # one output queue per guarantee


def setup_queues(broker: arrival.Broker) -> None:
    """Inputs ``in`` (exactly-once) and ``in2`` (at-least-once); one output per guarantee."""
    broker.create_queue("in", "exactly-once", ack_timeout=ACK_TIMEOUT_S, backoff=NO_BACKOFF)
    broker.create_queue("in2", "at-least-once", ack_timeout=ACK_TIMEOUT_S, backoff=NO_BACKOFF)
    broker.create_queue("eo", "exactly-once")
    broker.create_queue("alo", "at-least-once")
    broker.create_queue("amo", "at-most-once")


def feed(broker: arrival.Broker, queue: str, n: int, prefix: str = "m") -> None:
    p = broker.producer()
    for i in range(n):
        p.send(queue, f"{prefix}{i}".encode(), id=f"{prefix}{i}")


def outputs(broker: arrival.Broker) -> dict[str, arrival.Consumer]:
    """Consumers of every output queue, joined before anything is sent to them."""
    return {q: broker.consumer(q, "reader") for q in OUT_QUEUES}


def stored_ids(broker: arrival.Broker, queue: str) -> list[str | None]:
    return [m.id for m in broker.peek(queue, 1000)]


def nothing_visible(outs: dict[str, arrival.Consumer]) -> None:
    for q, c in outs.items():
        assert c.receive(timeout=0) is None, f"{q} shows an uncommitted message"


def send_to_all(tx: arrival.Transaction, tag: str) -> None:
    tx.send("eo", f"{tag}-eo".encode())
    tx.send_batch("alo", [f"{tag}-alo0".encode(), f"{tag}-alo1".encode()])
    tx.send("amo", f"{tag}-amo".encode())


def received_everything(outs: dict[str, arrival.Consumer], tag: str) -> None:
    assert bodies(drain(outs["eo"])) == [f"{tag}-eo".encode()]
    assert bodies(drain(outs["alo"])) == [f"{tag}-alo0".encode(), f"{tag}-alo1".encode()]
    # at-most-once sends are published once the commit is durable: wait for the handoff
    amo = outs["amo"].receive(timeout=2.0)
    assert amo is not None
    assert amo.body == f"{tag}-amo".encode()
    assert outs["amo"].receive(timeout=0) is None


# -- commit and abort ---------------------------------------------------------------------


def test_commit_makes_every_send_and_ack_visible_together(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    setup_queues(broker)
    feed(broker, "in", 2)
    feed(broker, "in2", 1, prefix="n")
    outs = outputs(broker)
    c1, c2 = broker.consumer("in", "g"), broker.consumer("in2", "g")
    a, b = c1.receive_batch(2, timeout=0)
    n = c2.receive(timeout=0)
    assert n is not None
    with broker.transaction("t") as tx:
        assert tx.state == "open"
        send_to_all(tx, "x")
        tx.ack(a)
        tx.ack(b)
        tx.ack(n)
        nothing_visible(outs)
        # the acks are not applied either: the messages are still leased to their consumer
        assert not a.lease_lost
        assert not n.lease_lost
    assert tx.state == "committed"
    received_everything(outs, "x")
    clock.advance(ACK_TIMEOUT_S * 3)  # past every lease: an unacked message would return
    assert c1.receive(timeout=0) is None
    assert c2.receive(timeout=0) is None
    assert broker.consumer("in", "g").receive(timeout=0) is None
    groups = {g.group: g for g in broker.stats("in").groups}
    assert (groups["g"].acked, groups["g"].in_flight, groups["g"].backlog) == (2, 0, 0)
    assert {g.group: g.acked for g in broker.stats("in2").groups}["g"] == 1


def test_exception_inside_with_aborts_everything(broker: arrival.Broker, clock: FakeClock) -> None:
    setup_queues(broker)
    feed(broker, "in", 1)
    feed(broker, "in2", 1, prefix="n")
    outs = outputs(broker)
    c1, c2 = broker.consumer("in", "g"), broker.consumer("in2", "g")
    m, n = c1.receive(timeout=0), c2.receive(timeout=0)
    assert m is not None
    assert n is not None
    tx = broker.transaction("t")

    def handler() -> None:
        with tx:
            send_to_all(tx, "x")
            tx.ack(m)
            tx.ack(n)
            raise RuntimeError("handler broke")

    with pytest.raises(RuntimeError, match="handler broke"):
        handler()
    assert tx.state == "aborted"
    nothing_visible(outs)
    assert broker.peek("eo") == []
    assert broker.peek("alo") == []
    # the acked messages are still leased to their consumer: nobody else gets them yet
    assert not m.lease_lost
    assert not n.lease_lost
    other = broker.consumer("in", "g")
    assert other.receive(timeout=0) is None
    # handing one back makes it available at once; the other returns when its lease ends
    m.release()
    again = other.receive(timeout=0)
    assert again is not None
    assert again.id == m.id
    clock.advance(ACK_TIMEOUT_S + 1)
    back = broker.consumer("in2", "g").receive(timeout=0)
    assert back is not None
    assert (back.id, back.attempt) == ("n0", 2)
    nothing_visible(outs)


def test_explicit_abort_discards_and_leaves_messages_leased(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    setup_queues(broker)
    feed(broker, "in", 1)
    outs = outputs(broker)
    c = broker.consumer("in", "g")
    m = c.receive(timeout=0)
    assert m is not None
    tx = broker.transaction("t")
    send_to_all(tx, "x")
    tx.ack(m)
    tx.abort()
    assert tx.state == "aborted"
    tx.abort()  # aborting again is harmless
    nothing_visible(outs)
    assert not m.lease_lost
    clock.advance(ACK_TIMEOUT_S + 1)
    back = c.receive(timeout=0)
    assert back is not None
    assert (back.id, back.attempt) == ("m0", 2)
    back.ack()  # and it can still be processed normally
    nothing_visible(outs)


@pytest.mark.parametrize("end", ["commit", "abort", "exception", "refused"])
def test_a_finished_transaction_refuses_further_use(
    broker: arrival.Broker, clock: FakeClock, end: str
) -> None:
    setup_queues(broker)
    feed(broker, "in", 2)
    c = broker.consumer("in", "g")
    m, other = c.receive_batch(2, timeout=0)
    tx = broker.transaction("t", timeout=5)
    tx.send("eo", b"first")
    tx.ack(m)
    if end == "commit":
        tx.commit()
        assert tx.state == "committed"
    elif end == "abort":
        tx.abort()
        assert tx.state == "aborted"
    elif end == "exception":
        with pytest.raises(KeyError), tx:
            raise KeyError("boom")
        assert tx.state == "aborted"
    else:
        clock.advance(6)
        with pytest.raises(TransactionTimedOut):
            tx.commit()
        assert tx.state == "aborted"
    before = stored_ids(broker, "eo")
    with pytest.raises(TransactionError, match="open a new one"):
        tx.send("eo", b"late")
    with pytest.raises(TransactionError):
        tx.send_batch("eo", [b"late"])
    with pytest.raises(TransactionError):
        tx.ack(other)
    with pytest.raises(TransactionError):
        tx.commit()
    assert stored_ids(broker, "eo") == before
    # the refused ack did not settle ``other``: it is still leased and can be acked
    assert not other.lease_lost
    other.ack()


def test_commit_with_nothing_in_it_succeeds(broker: arrival.Broker) -> None:
    setup_queues(broker)
    with broker.transaction("t") as tx:
        pass
    assert tx.state == "committed"
    assert repr(tx).startswith("<Transaction 't' committed")


def test_ack_arguments_are_checked(stores: Stores) -> None:
    b1, b2 = stores.open(), arrival.connect("memory:")
    try:
        setup_queues(b1)
        setup_queues(b2)
        feed(b2, "in", 1)
        foreign = b2.consumer("in", "g").receive(timeout=0)
        assert foreign is not None
        tx = b1.transaction("t")
        with pytest.raises(TypeError, match="received message"):
            tx.ack("m0")  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="same broker"):
            tx.ack(foreign)
        assert tx.state == "open"
        tx.abort()
    finally:
        b2.close()


def test_transactional_id_must_be_a_valid_name(broker: arrival.Broker) -> None:
    setup_queues(broker)
    with pytest.raises(UsageError):
        broker.transaction("")


# -- crashes ------------------------------------------------------------------------------


def _crash_setup(broker: arrival.Broker) -> tuple[arrival.Consumer, arrival.Message]:
    setup_queues(broker)
    feed(broker, "in", 1)
    c = broker.consumer("in", "g")
    m = c.receive(timeout=0)
    assert m is not None
    return c, m


def _build(tx: arrival.Transaction, m: arrival.Message) -> None:
    tx.send("eo", b"e0")
    tx.send("eo", b"e1")
    tx.send_batch("alo", [b"a0", b"a1", b"a2"])
    tx.ack(m)


def _after_restart(stores: Stores, clock: FakeClock) -> tuple[int, int, bool]:
    """(messages in eo, messages in alo, whether the input came back) after a restart."""
    b = stores.open()
    setup_queues(b)
    n_eo = len(drain(b.consumer("eo", "reader")))
    n_alo = len(drain(b.consumer("alo", "reader")))
    clock.advance(ACK_TIMEOUT_S + 1)  # any lease of the crashed broker has ended
    back = b.consumer("in", "g").receive(timeout=0)
    b.close()
    return n_eo, n_alo, back is not None


def test_crash_before_commit_leaves_nothing(stores: Stores, clock: FakeClock) -> None:
    b = stores.open()
    _c, m = _crash_setup(b)
    tx = b.transaction("t")
    _build(tx, m)
    stores.crash(b)
    with pytest.raises((ClosedError, BrokerUnreachable)):
        tx.commit()  # the broker it began on is gone (over the network: the connection)
    assert tx.state == "aborted"
    assert _after_restart(stores, clock) == (0, 0, True)


def test_crash_right_after_commit_returned_keeps_everything(
    stores: Stores, clock: FakeClock
) -> None:
    b = stores.open()
    _c, m = _crash_setup(b)
    with b.transaction("t") as tx:
        _build(tx, m)
    stores.crash(b)
    assert _after_restart(stores, clock) == (2, 3, False)


def test_crash_while_committing_is_all_or_nothing(stores: Stores, clock: FakeClock) -> None:
    """The commit is handed to the broker and the broker dies at once: whatever instant the
    crash lands at, a restart finds all of the transaction or none of it."""
    outcomes = set()
    for i in range(12):
        b = stores.open()
        setup_queues(b)
        names = (f"in-{i}", f"eo-{i}", f"alo-{i}")
        b.create_queue(names[0], "exactly-once", ack_timeout=ACK_TIMEOUT_S)
        b.create_queue(names[1], "exactly-once")
        b.create_queue(names[2], "at-least-once")
        b.producer().send(names[0], b"input", id=f"input-{i}")
        m = b.consumer(names[0], "g").receive(timeout=0)
        assert m is not None
        tx = b.transaction(f"t-{i}")
        tx.send_batch(names[1], [b"e0", b"e1"])
        tx.send_batch(names[2], [b"a0", b"a1", b"a2"])
        tx.ack(m)
        tx._core.submit()  # the client's last act: the commit is in the broker's hands
        stores.crash(b)
        b = stores.open()
        n_eo = len(drain(b.consumer(names[1], "reader")))
        n_alo = len(drain(b.consumer(names[2], "reader")))
        clock.advance(ACK_TIMEOUT_S + 1)
        back = b.consumer(names[0], "g").receive(timeout=0) is not None
        b.close()
        assert (n_eo, n_alo, back) in ((2, 3, False), (0, 0, True)), (i, n_eo, n_alo, back)
        outcomes.add(back)
    assert outcomes  # which outcomes occur depends on timing; each one must be whole


class _FailingCommit:
    """Stands in for ``storage.commit``: the disk fails on the transaction's write, before
    or after the data reached it (a crash between write and acknowledgement)."""

    def __init__(self, real: Callable[[WriteSet], None], after_write: bool) -> None:
        self.real = real
        self.after_write = after_write
        self.fired = False

    def __call__(self, ws: WriteSet) -> None:
        if not self.fired and any(q == "eo" for q, *_ in ws.batches):
            self.fired = True
            if self.after_write:
                self.real(ws)
            raise OSError("the disk went away")
        self.real(ws)


@pytest.mark.parametrize("after_write", [False, True], ids=["before-write", "after-write"])
def test_storage_failure_during_commit_is_all_or_nothing(
    stores: Stores, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, after_write: bool
) -> None:
    b = stores.open()
    _c, m = _crash_setup(b)
    storage = engine_of(b).storage
    failing = _FailingCommit(storage.commit, after_write)
    monkeypatch.setattr(storage, "commit", failing)
    tx = b.transaction("t")
    _build(tx, m)
    with pytest.raises(StorageError):
        tx.commit()  # not confirmed: the caller must not count on it either way
    assert failing.fired
    assert tx.state == "aborted"
    stores.crash(b)
    monkeypatch.undo()
    expected = (2, 3, False) if after_write else (0, 0, True)
    assert _after_restart(stores, clock) == expected


class _FailWhenReleased:
    """Stands in for ``storage.commit``: holds the first write with an ``eo`` batch, then
    fails it, as a disk that stalls and dies."""

    def __init__(self, real: Callable[[WriteSet], None]) -> None:
        self.real = real
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, ws: WriteSet) -> None:
        if not self.entered.is_set() and any(q == "eo" for q, *_ in ws.batches):
            self.entered.set()
            self.release.wait(10)
            raise OSError("the disk went away")
        self.real(ws)


def test_a_commit_queued_behind_a_failing_write_fails_too(
    broker: arrival.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction whose commit is queued (its barrier taken) while an earlier write is
    failing must fail with it, not wait forever for a commit that will never come."""
    setup_queues(broker)
    failing = _FailWhenReleased(engine_of(broker).storage.commit)
    monkeypatch.setattr(engine_of(broker).storage, "commit", failing)
    first = broker.transaction("first")
    first.send("eo", b"1")
    outcome: list[BaseException | None] = []

    def commit_first() -> None:
        try:
            first.commit()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            outcome.append(exc)

    t = threading.Thread(target=commit_first)
    t.start()
    assert failing.entered.wait(10)
    second = broker.transaction("second")  # queued while the first write is on the disk
    second.send("eo", b"2")
    threading.Timer(0.05, failing.release.set).start()
    try:
        with pytest.raises(StorageError):
            second.commit(timeout=1.5)  # a TimeoutError here means it would hang forever
    finally:
        failing.release.set()
        t.join(10)
    assert len(outcome) == 1
    assert isinstance(outcome[0], StorageError)


def test_no_transaction_commits_after_a_storage_failure(
    broker: arrival.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup_queues(broker)
    monkeypatch.setattr(
        engine_of(broker).storage, "commit", _FailingCommit(engine_of(broker).storage.commit, False)
    )
    tx = broker.transaction("t")
    tx.send("eo", b"x")
    with pytest.raises(StorageError):
        tx.commit()
    with pytest.raises(StorageError, match="reopen"):
        broker.transaction("t")


# -- fencing ------------------------------------------------------------------------------


@pytest.mark.parametrize("newer", ["open", "commits-first", "aborts"])
def test_opening_an_id_again_fences_the_earlier_holder(
    broker: arrival.Broker, clock: FakeClock, newer: str
) -> None:
    setup_queues(broker)
    feed(broker, "in", 2)
    outs = outputs(broker)
    c = broker.consumer("in", "g")
    m0, m1 = c.receive_batch(2, timeout=0)
    old = broker.transaction("t")
    send_to_all(old, "old")
    old.ack(m0)
    new = broker.transaction("t")
    new.send("eo", b"new-eo")
    new.ack(m1)
    if newer == "commits-first":
        new.commit()
    elif newer == "aborts":
        new.abort()
    with pytest.raises(ProducerFenced, match="'t'"):
        old.commit()
    assert old.state == "aborted"
    if newer == "open":
        new.commit()
    got = bodies(drain(outs["eo"]))
    assert got == ([] if newer == "aborts" else [b"new-eo"])
    assert drain(outs["alo"]) == []
    assert outs["amo"].receive(timeout=0.05) is None
    # the zombie's ack did not happen: m0 is still leased, then comes back
    assert not m0.lease_lost
    clock.advance(ACK_TIMEOUT_S + 1)
    back = {m.id for m in drain(c)}
    assert "m0" in back
    assert ("m1" in back) == (newer == "aborts")


def test_other_transactional_ids_do_not_fence_each_other(broker: arrival.Broker) -> None:
    setup_queues(broker)
    a, b = broker.transaction("a"), broker.transaction("b")
    a.send("eo", b"a")
    b.send("eo", b"b")
    b.commit()
    a.commit()
    assert sorted(bodies(drain(broker.consumer("eo", "g")))) == [b"a", b"b"]


def test_a_transaction_begun_before_a_restart_is_fenced(stores: Stores, clock: FakeClock) -> None:
    b1 = stores.open()
    setup_queues(b1)
    old = b1.transaction("t")
    old.send("eo", b"before-the-crash")
    stores.crash(b1)
    b2 = stores.open()
    setup_queues(b2)
    new = b2.transaction("t")  # the same id, and the same per-run counter as before
    # what a remote client whose transaction outlived the broker would hand in
    records = engine_of(b2).records("eo", [(None, None, None, b"before-the-crash")])
    core = old._core
    with pytest.raises(ProducerFenced, match="restarted"):
        engine_of(b2).commit_transaction(
            "t", core.epoch, clock.now(), core.timeout, [("eo", records)], []
        )
    # the handle to the dead broker cannot commit either
    with pytest.raises((ClosedError, BrokerUnreachable)):
        old.commit()
    new.send("eo", b"after")
    new.commit()
    assert bodies(drain(b2.consumer("eo", "g"))) == [b"after"]


# -- timeout ------------------------------------------------------------------------------


def test_transaction_timeout_aborts(broker: arrival.Broker, clock: FakeClock) -> None:
    setup_queues(broker)
    feed(broker, "in", 1)
    outs = outputs(broker)
    c = broker.consumer("in", "g")
    m = c.receive(timeout=0)
    assert m is not None
    tx = broker.transaction("t", timeout=5)
    send_to_all(tx, "x")
    tx.ack(m)
    clock.advance(6)
    with pytest.raises(TransactionTimedOut) as info:
        tx.commit()
    assert "'t'" in str(info.value)
    assert tx.state == "aborted"
    nothing_visible(outs)
    clock.advance(ACK_TIMEOUT_S)
    back = c.receive(timeout=0)
    assert back is not None
    assert (back.id, back.attempt) == ("m0", 2)
    # the id is free again for a fresh transaction
    with broker.transaction("t", timeout=5) as again:
        again.send("eo", b"retry")
        again.ack(back)
    assert bodies(drain(outs["eo"])) == [b"retry"]


def test_transaction_within_its_timeout_commits(broker: arrival.Broker, clock: FakeClock) -> None:
    setup_queues(broker)
    tx = broker.transaction("t", timeout=5)
    tx.send("eo", b"in-time")
    clock.advance(4.5)
    tx.commit()
    assert bodies(drain(broker.consumer("eo", "g"))) == [b"in-time"]


@pytest.mark.parametrize("timeout", [0, -1, -0.5, "x", None, True])
def test_bad_transaction_timeouts_are_refused(broker: arrival.Broker, timeout: Any) -> None:
    setup_queues(broker)
    with pytest.raises(UsageError, match="timeout"):
        broker.transaction("t", timeout=timeout)


def test_nan_transaction_timeout_is_refused(broker: arrival.Broker) -> None:
    setup_queues(broker)
    with pytest.raises(UsageError, match="timeout"):
        broker.transaction("t", timeout=math.nan)


# -- leases lost before commit ------------------------------------------------------------


def test_commit_refused_when_an_acked_lease_expired(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    setup_queues(broker)
    feed(broker, "in", 2)
    outs = outputs(broker)
    c = broker.consumer("in", "g")
    m0 = c.receive(timeout=0)
    clock.advance(ACK_TIMEOUT_S / 2)
    m1 = c.receive(timeout=0)  # leased later: still held at commit time
    assert m0 is not None
    assert m1 is not None
    tx = broker.transaction("t")
    send_to_all(tx, "x")
    tx.ack(m1)
    tx.ack(m0)
    clock.advance(ACK_TIMEOUT_S / 2 + 1)  # m0's lease is over, m1's is not
    assert m0.lease_lost
    assert not m1.lease_lost
    with pytest.raises(LeaseExpired) as info:
        tx.commit()
    assert info.value.offset == m0.offset
    assert tx.state == "aborted"
    nothing_visible(outs)  # not even the sends
    # m1's ack was not applied either: it is still held, and acks normally
    assert not m1.lease_lost
    m1.ack()
    back = c.receive(timeout=0)
    assert back is not None
    assert (back.id, back.attempt) == ("m0", 2)


def test_a_zombies_late_ack_is_refused_while_another_consumer_holds_it(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    setup_queues(broker)
    feed(broker, "in", 1)
    outs = outputs(broker)
    zombie, live = broker.consumer("in", "g"), broker.consumer("in", "g")
    stale = zombie.receive(timeout=0)
    assert stale is not None
    clock.advance(ACK_TIMEOUT_S + 1)
    fresh = live.receive(timeout=0)
    assert fresh is not None
    assert (fresh.id, fresh.attempt) == ("m0", 2)
    tx = broker.transaction("zombie")
    send_to_all(tx, "zombie")
    tx.ack(stale)
    with pytest.raises(LeaseExpired), tx:
        pass  # leaving the block commits
    nothing_visible(outs)
    assert not fresh.lease_lost  # the zombie did not take it from the live consumer
    with broker.transaction("live") as tx2:
        send_to_all(tx2, "live")
        tx2.ack(fresh)
    received_everything(outs, "live")


def test_a_zombies_ack_of_a_message_settled_elsewhere_is_refused(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    setup_queues(broker)
    feed(broker, "in", 1)
    outs = outputs(broker)
    zombie, live = broker.consumer("in", "g"), broker.consumer("in", "g")
    stale = zombie.receive(timeout=0)
    assert stale is not None
    clock.advance(ACK_TIMEOUT_S + 1)
    fresh = live.receive(timeout=0)
    assert fresh is not None
    fresh.ack()
    tx = broker.transaction("zombie")
    send_to_all(tx, "zombie")
    tx.ack(stale)
    with pytest.raises(AlreadySettled):
        tx.commit()
    nothing_visible(outs)


def test_consumer_closed_before_commit_refuses_the_ack(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    setup_queues(broker)
    feed(broker, "in", 1)
    outs = outputs(broker)
    c = broker.consumer("in", "g")
    m = c.receive(timeout=0)
    assert m is not None
    tx = broker.transaction("t")
    send_to_all(tx, "x")
    tx.ack(m)
    c.close()  # releases the lease: another member may take the message now
    with pytest.raises(LeaseExpired):
        tx.commit()
    nothing_visible(outs)
    back = broker.consumer("in", "g").receive(timeout=0)
    assert back is not None
    assert back.id == "m0"


def test_acking_the_same_message_twice_in_one_transaction_is_harmless(
    broker: arrival.Broker, clock: FakeClock
) -> None:
    setup_queues(broker)
    feed(broker, "in", 1)
    c = broker.consumer("in", "g")
    m = c.receive(timeout=0)
    assert m is not None
    with broker.transaction("t") as tx:
        tx.ack(m)
        tx.send("eo", b"out")
        tx.ack(m)
    assert c.stats().acked == 1
    (g,) = broker.stats("in").groups
    assert (g.acked, g.in_flight) == (1, 0)
    # one input, acked twice: outputs still derive their id from it
    assert stored_ids(broker, "eo") == ["m0/0"]
    clock.advance(ACK_TIMEOUT_S + 1)
    assert c.receive(timeout=0) is None


def test_ack_of_an_at_most_once_message_in_a_transaction_is_a_no_op(
    broker: arrival.Broker,
) -> None:
    setup_queues(broker)
    c = broker.consumer("amo", "g")
    broker.producer().send("amo", b"fire")
    m = c.receive(timeout=1.0)
    assert m is not None
    with broker.transaction("t") as tx:
        tx.ack(m)
        tx.send("eo", b"out")
    assert bodies(drain(broker.consumer("eo", "g"))) == [b"out"]


# -- at-most-once outputs wait for durability ---------------------------------------------


class _GatedCommit:
    """Stands in for ``storage.commit``: holds the transaction's write until released."""

    def __init__(self, real: Callable[[WriteSet], None]) -> None:
        self.real = real
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, ws: WriteSet) -> None:
        if any(q == "eo" for q, *_ in ws.batches):
            self.entered.set()
            assert self.release.wait(10), "the test never released the commit"
        self.real(ws)


def test_at_most_once_outputs_are_handed_out_only_after_the_commit_is_durable(
    broker: arrival.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup_queues(broker)
    outs = outputs(broker)
    gate = _GatedCommit(engine_of(broker).storage.commit)
    monkeypatch.setattr(engine_of(broker).storage, "commit", gate)
    tx = broker.transaction("t")
    send_to_all(tx, "x")
    errors: list[BaseException] = []

    def commit() -> None:
        try:
            tx.commit()
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)

    t = threading.Thread(target=commit)
    t.start()
    try:
        assert gate.entered.wait(10)
        # the commit is being written but not durable: nothing is handed out, not even
        # the at-most-once message, which needs no durability of its own
        assert tx.state == "committing"
        nothing_visible(outs)
        assert t.is_alive()
    finally:
        gate.release.set()
        t.join(10)
    assert not errors
    assert tx.state == "committed"
    received_everything(outs, "x")


class _HoldAfterFinish:
    """Stands in for ``arrival.engine._ticket_lock``: when the writer thread leaves it
    after completing a Ticket, it waits until the test has looked at the queues."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.looked = threading.Event()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        if threading.current_thread().name == "arrival-writer":
            self.looked.wait(5)


def test_at_most_once_outputs_are_receivable_when_commit_returns(
    broker: arrival.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup_queues(broker)
    c = broker.consumer("amo", "reader")
    registered = threading.Event()
    original = arrival.engine.Ticket.add_done_callback
    real_commit = engine_of(broker).storage.commit

    def add_done_callback(self: arrival.engine.Ticket, cb: Callable[[], None]) -> None:
        original(self, cb)
        registered.set()

    def commit(ws: WriteSet) -> None:
        registered.wait(5)  # let the transaction register its callback first
        real_commit(ws)

    hold = _HoldAfterFinish()
    monkeypatch.setattr(arrival.engine.Ticket, "add_done_callback", add_done_callback)
    monkeypatch.setattr(engine_of(broker).storage, "commit", commit)
    monkeypatch.setattr(arrival.engine, "_ticket_lock", hold)
    try:
        with broker.transaction("t") as tx:
            tx.send("amo", b"fire")
        got = c.receive(timeout=0)
    finally:
        hold.looked.set()
    assert got is not None
    assert got.body == b"fire"


# -- deterministic output ids -------------------------------------------------------------


def test_outputs_of_a_source_get_numbered_ids(broker: arrival.Broker) -> None:
    setup_queues(broker)
    feed(broker, "in", 2)
    broker.producer().send("in", b"anonymous")  # no id: its id is "in:2"
    c = broker.consumer("in", "g")
    a, b, anon = c.receive_batch(3, timeout=0)
    assert anon.id == "in:2"
    with broker.transaction("t") as tx:
        tx.send("eo", b"a0", source=a)
        tx.send("alo", b"a1", source=a)
        tx.send("eo", b"b0", source=b)
        tx.send_batch("eo", [b"a2", b"a3"], source=a)
        tx.send("eo", b"named", source=a, id="explicit")
        tx.send("eo", b"anon0", source=anon)
        for m in (a, b, anon):
            tx.ack(m)
    assert stored_ids(broker, "eo") == ["m0/0", "m1/0", "m0/2", "m0/3", "explicit", "in:2/0"]
    assert stored_ids(broker, "alo") == ["m0/1"]


def test_outputs_of_the_one_acked_input_derive_their_ids_from_it(broker: arrival.Broker) -> None:
    setup_queues(broker)
    feed(broker, "in", 1)
    m = broker.consumer("in", "g").receive(timeout=0)
    assert m is not None
    with broker.transaction("t") as tx:
        tx.send("eo", b"with-source", source=m)  # m0/0
        tx.send("eo", b"plain")  # numbered after the sourced ones: m0/1
        tx.send_batch("alo", [b"p1", b"p2"])  # m0/2, m0/3
        tx.send("eo", b"named", id="mine")
        tx.ack(m)
    assert stored_ids(broker, "eo") == ["m0/0", "m0/1", "mine"]
    assert stored_ids(broker, "alo") == ["m0/2", "m0/3"]


def test_without_a_single_input_outputs_keep_broker_ids(broker: arrival.Broker) -> None:
    setup_queues(broker)
    feed(broker, "in", 2)
    m0, m1 = broker.consumer("in", "g").receive_batch(2, timeout=0)
    with broker.transaction("two-inputs") as tx:
        tx.send("alo", b"x")
        tx.ack(m0)
        tx.ack(m1)
    with broker.transaction("no-input") as tx2:
        tx2.send("alo", b"y")
    assert stored_ids(broker, "alo") == [None, None]
    assert [m.id for m in drain(broker.consumer("alo", "g"))] == ["alo:0", "alo:1"]


def _handle(tx: arrival.Transaction, m: arrival.Message) -> None:
    """A transactional handler: three outputs, no ids given, then the ack."""
    tx.send("eo", m.body + b"-a")
    tx.send("eo", m.body + b"-b")
    tx.send("alo", m.body + b"-c")
    tx.ack(m)


def test_a_retried_handler_produces_the_same_ids(broker: arrival.Broker, clock: FakeClock) -> None:
    setup_queues(broker)
    feed(broker, "in", 1)
    c = broker.consumer("in", "g")
    first = c.receive(timeout=0)
    assert first is not None

    # attempt 1 fails after building its outputs: nothing is kept
    def attempt_1(m: arrival.Message) -> None:
        with broker.transaction("t") as tx:
            _handle(tx, m)
            raise ValueError("downstream hiccup")

    with pytest.raises(ValueError, match="hiccup"):
        attempt_1(first)
    first.release()
    # attempt 2 is refused at commit: its lease ran out while it worked
    second = c.receive(timeout=0)
    assert second is not None
    assert second.attempt == 2
    tx2 = broker.transaction("t")
    _handle(tx2, second)
    clock.advance(ACK_TIMEOUT_S + 1)
    with pytest.raises(LeaseExpired):
        tx2.commit()
    # attempt 3 commits, with the ids every attempt would have had
    third = c.receive(timeout=0)
    assert third is not None
    assert third.attempt == 3
    with broker.transaction("t") as tx3:
        _handle(tx3, third)
    assert stored_ids(broker, "eo") == ["m0/0", "m0/1"]
    assert stored_ids(broker, "alo") == ["m0/2"]
    # a zombie that replays the handler's outputs (no ack: it lost the message) adds
    # nothing to the exactly-once queue, whose dedup recognises the ids
    with broker.transaction("zombie") as z:
        z.send("eo", b"m0-a", source=first)
        z.send("eo", b"m0-b", source=first)
    assert stored_ids(broker, "eo") == ["m0/0", "m0/1"]
    assert bodies(drain(broker.consumer("eo", "g"))) == [b"m0-a", b"m0-b"]


def test_exactly_once_output_stores_a_duplicate_id_once(broker: arrival.Broker) -> None:
    setup_queues(broker)
    with broker.transaction("t") as tx:
        tx.send("eo", b"first", id="dup")
        tx.send("eo", b"second", id="dup")  # within one transaction
        tx.send("eo", b"other", id="other")
    with broker.transaction("t") as tx2:
        tx2.send("eo", b"third", id="dup")  # in a later transaction
        tx2.send("eo", b"fresh", id="fresh")
    assert stored_ids(broker, "eo") == ["dup", "other", "fresh"]
    assert bodies(drain(broker.consumer("eo", "g"))) == [b"first", b"other", b"fresh"]


# -- limits checked at send time ----------------------------------------------------------


def test_a_transaction_over_the_size_limit_is_refused(
    broker: arrival.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup_queues(broker)
    monkeypatch.setattr(arrival._common, "MAX_TRANSACTION_BYTES", 100)
    outs = outputs(broker)
    with broker.transaction("t") as tx:
        tx.send("eo", b"x" * 60)
        tx.send("alo", b"y" * 40)  # exactly at the limit
        with pytest.raises(TransactionError, match="100 bytes"):
            tx.send("alo", b"z")
        with pytest.raises(TransactionError):
            tx.send_batch("eo", [b"z"])
        assert tx.state == "open"  # the refused send is not part of it
    assert bodies(drain(outs["eo"])) == [b"x" * 60]
    assert bodies(drain(outs["alo"])) == [b"y" * 40]
    with pytest.raises(TransactionError), broker.transaction("t2") as tx2:
        tx2.send_batch("eo", [b"a" * 50, b"b" * 51])
    assert drain(outs["eo"]) == []


def test_unknown_queue_is_refused_at_send_time(broker: arrival.Broker) -> None:
    setup_queues(broker)
    with broker.transaction("t") as tx:
        tx.send("eo", b"ok")
        with pytest.raises(UnknownQueue, match="nope"):
            tx.send("nope", b"lost")
        with pytest.raises(UnknownQueue):
            tx.send_batch("nope", [b"lost"])
    assert bodies(drain(broker.consumer("eo", "g"))) == [b"ok"]


def test_message_too_large_is_refused_at_send_time(broker: arrival.Broker) -> None:
    setup_queues(broker)
    broker.create_queue("small", "exactly-once", max_message_bytes=1024)
    with broker.transaction("t") as tx:
        tx.send("small", b"x" * 1024)
        with pytest.raises(MessageTooLarge) as info:
            tx.send("small", b"x" * 1025)
        assert (info.value.size_bytes, info.value.limit_bytes) == (1025, 1024)
        with pytest.raises(MessageTooLarge):
            tx.send("small", b"x" * 1000, headers={"h": "v" * 100})
        with pytest.raises(MessageTooLarge):
            tx.send_batch("small", [b"ok", b"x" * 2000])
    assert bodies(drain(broker.consumer("small", "g"))) == [b"x" * 1024]


def test_send_checks_field_types(broker: arrival.Broker) -> None:
    setup_queues(broker)
    tx = broker.transaction("t")
    with pytest.raises(TypeError, match="bytes"):
        tx.send("eo", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key"):
        tx.send("eo", b"x", key=7)  # type: ignore[arg-type]
    tx.abort()


# =========================================================================================
# arrival.aio (run with asyncio.run, as tests/test_aio.py does)
# =========================================================================================


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def with_broker(
    stores: Stores, clock: FakeClock, body: Callable[[arrival.aio.Broker], Awaitable[T]]
) -> T:
    async def main() -> T:
        broker = await stores.aopen()
        try:
            await broker.create_queue(
                "in", "exactly-once", ack_timeout=ACK_TIMEOUT_S, backoff=NO_BACKOFF
            )
            await broker.create_queue(
                "in2", "at-least-once", ack_timeout=ACK_TIMEOUT_S, backoff=NO_BACKOFF
            )
            await broker.create_queue("eo", "exactly-once")
            await broker.create_queue("alo", "at-least-once")
            await broker.create_queue("amo", "at-most-once")
            return await body(broker)
        finally:
            await broker.close()

    return run(main())


async def _afeed(broker: arrival.aio.Broker, queue: str, n: int, prefix: str = "m") -> None:
    p = broker.producer()
    for i in range(n):
        await p.send(queue, f"{prefix}{i}".encode(), id=f"{prefix}{i}")


async def _adrain(consumer: arrival.aio.Consumer) -> list[arrival.aio.Message]:
    out: list[arrival.aio.Message] = []
    while (msg := await consumer.receive(timeout=0)) is not None:
        out.append(msg)
        await msg.ack()
    return out


async def _anothing(outs: dict[str, arrival.aio.Consumer]) -> None:
    for q, c in outs.items():
        assert await c.receive(timeout=0) is None, f"{q} shows an uncommitted message"


async def _asend_all(tx: arrival.aio.Transaction, tag: str) -> None:
    await tx.send("eo", f"{tag}-eo".encode())
    await tx.send_batch("alo", [f"{tag}-alo0".encode(), f"{tag}-alo1".encode()])
    await tx.send("amo", f"{tag}-amo".encode())


def test_aio_commit_makes_sends_and_acks_visible_together(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        await _afeed(b, "in", 1)
        await _afeed(b, "in2", 1, prefix="n")
        outs = {q: b.consumer(q, "reader") for q in OUT_QUEUES}
        c1, c2 = b.consumer("in", "g"), b.consumer("in2", "g")
        m, n = await c1.receive(timeout=0), await c2.receive(timeout=0)
        assert m is not None
        assert n is not None
        async with b.transaction("t") as tx:
            await _asend_all(tx, "x")
            await tx.ack(m)
            await tx.ack(n)
            await _anothing(outs)
        assert tx.state == "committed"
        assert [x.body for x in await _adrain(outs["eo"])] == [b"x-eo"]
        assert [x.body for x in await _adrain(outs["alo"])] == [b"x-alo0", b"x-alo1"]
        amo = await outs["amo"].receive(timeout=2.0)
        assert amo is not None
        assert amo.body == b"x-amo"
        clock.advance(ACK_TIMEOUT_S + 1)
        assert await c1.receive(timeout=0) is None
        assert await c2.receive(timeout=0) is None

    with_broker(stores, clock, body)


def test_aio_outputs_are_visible_and_numbered(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        await _afeed(b, "in", 1)
        outs = {q: b.consumer(q, "reader") for q in OUT_QUEUES}
        m = await b.consumer("in", "g").receive(timeout=0)
        assert m is not None
        async with b.transaction("t") as tx:
            await _asend_all(tx, "x")
            await tx.ack(m)
        assert [(x.id, x.body) for x in await _adrain(outs["eo"])] == [("m0/0", b"x-eo")]
        assert [(x.id, x.body) for x in await _adrain(outs["alo"])] == [
            ("m0/1", b"x-alo0"),
            ("m0/2", b"x-alo1"),
        ]
        amo = await outs["amo"].receive(timeout=2.0)
        assert amo is not None
        assert amo.body == b"x-amo"

    with_broker(stores, clock, body)


def test_aio_exception_aborts_and_finished_transaction_is_refused(
    stores: Stores, clock: FakeClock
) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        await _afeed(b, "in", 1)
        outs = {q: b.consumer(q, "reader") for q in OUT_QUEUES}
        c = b.consumer("in", "g")
        m = await c.receive(timeout=0)
        assert m is not None
        tx = b.transaction("t")

        async def handler() -> None:
            async with tx:
                await _asend_all(tx, "x")
                await tx.ack(m)
                raise RuntimeError("broke")

        with pytest.raises(RuntimeError):
            await handler()
        assert tx.state == "aborted"
        await _anothing(outs)
        assert not m.lease_lost
        with pytest.raises(TransactionError):
            await tx.send("eo", b"late")
        with pytest.raises(TransactionError):
            await tx.commit()
        tx2 = b.transaction("t")
        await tx2.send("eo", b"y")
        await tx2.abort()
        assert tx2.state == "aborted"
        await _anothing(outs)
        clock.advance(ACK_TIMEOUT_S + 1)
        back = await c.receive(timeout=0)
        assert back is not None
        assert back.attempt == 2

    with_broker(stores, clock, body)


def test_aio_fencing_timeout_and_lost_lease(stores: Stores, clock: FakeClock) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        await _afeed(b, "in", 3)
        outs = {q: b.consumer(q, "reader") for q in OUT_QUEUES}
        c = b.consumer("in", "g")
        m0, m1, m2 = await c.receive_batch(3, timeout=0)
        # fencing: the earlier holder of "t" cannot commit
        old, new = b.transaction("t"), None
        await _asend_all(old, "old")
        await old.ack(m0)
        new = b.transaction("t")
        with pytest.raises(ProducerFenced):
            await old.commit()
        await new.abort()
        # timeout
        slow = b.transaction("slow", timeout=5)
        await _asend_all(slow, "slow")
        await slow.ack(m1)
        clock.advance(6)
        with pytest.raises(TransactionTimedOut):
            await slow.commit()
        assert slow.state == "aborted"
        # lost lease: every lease is over now
        late = b.transaction("late")
        await _asend_all(late, "late")
        await late.ack(m2)
        clock.advance(ACK_TIMEOUT_S)
        with pytest.raises(LeaseExpired):
            await late.commit()
        await _anothing(outs)
        back = await _adrain(c)
        assert sorted(x.id for x in back) == ["m0", "m1", "m2"]

    with_broker(stores, clock, body)


@pytest.mark.parametrize("timeout", [0, -1, "x"])
def test_aio_bad_timeouts_are_refused(stores: Stores, clock: FakeClock, timeout: Any) -> None:
    async def body(b: arrival.aio.Broker) -> None:
        with pytest.raises(UsageError):
            b.transaction("t", timeout=timeout)

    with_broker(stores, clock, body)


def test_aio_limits_are_checked_at_send_time(
    stores: Stores, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(arrival._common, "MAX_TRANSACTION_BYTES", 10)

    async def body(b: arrival.aio.Broker) -> None:
        await b.create_queue("small", "exactly-once", max_message_bytes=1024)
        tx = b.transaction("t")
        with pytest.raises(UnknownQueue):
            await tx.send("nope", b"x")
        with pytest.raises(TransactionError):
            await tx.send("eo", b"x" * 11)
        await tx.abort()
        monkeypatch.setattr(arrival._common, "MAX_TRANSACTION_BYTES", 1 << 20)
        tx2 = b.transaction("t")
        with pytest.raises(MessageTooLarge):
            await tx2.send("small", b"x" * 1025)
        await tx2.send("small", b"ok")
        await tx2.commit()
        assert [x.body for x in await _adrain(b.consumer("small", "g"))] == [b"ok"]

    with_broker(stores, clock, body)
