"""Exactly-once sends and acks through the engine and the public API, on every store.

Idempotent producers (id, epoch, sequence), message-id deduplication, the producer
horizon, confirmed acks, and what ``describe()`` says about them; each through crashes
(``stores.crash``: nothing pending is committed) and reopen.

``Gate`` wraps a store so a test can hold the writer inside a commit (to act while a send
is not yet durable) or make a commit fail as a crash before or after it would.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import msgspec
import pytest

import arrival
from arrival.engine import Ticket
from arrival.errors import (
    DedupHorizonPassed,
    ProducerFenced,
    SequenceError,
    StorageError,
    UnknownQueue,
    UsageError,
)
from arrival.storage.base import Loaded, Storage, WriteSet
from conftest import NO_BACKOFF, Stores, bodies, drain, engine_of

GATE_WAIT_S = 10.0  # generous: only a broken engine makes a test wait this long


class Gate:
    """A store whose commits a test can hold, or fail as a crash before/after the write."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self._open = threading.Event()
        self._open.set()
        self.entered = threading.Event()  # a commit arrived while held
        self.held: list[WriteSet] = []
        self.crash: str | None = None  # None, "before" or "after" the write

    @property
    def syncs(self) -> int:
        return self.inner.syncs

    @property
    def commits(self) -> int:
        return self.inner.commits

    @property
    def description(self) -> dict[str, str]:
        return self.inner.description

    def load(self) -> Loaded:
        return self.inner.load()

    def read(self, queue: str, first: int) -> bytes:
        return self.inner.read(queue, first)

    def close(self) -> None:
        self.inner.close()

    def hold(self) -> None:
        self.entered.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def commit(self, ws: WriteSet) -> None:
        if not self._open.is_set():
            self.held.append(ws)
            self.entered.set()
            self._open.wait(GATE_WAIT_S)
        if self.crash == "before":
            raise OSError("simulated crash before the commit")
        self.inner.commit(ws)
        if self.crash == "after":
            raise OSError("simulated crash after the commit, before any send was acknowledged")


@pytest.fixture
def gated(stores: Stores) -> Iterator[list[Gate]]:
    """Gates opened in a test; released at the end so no writer stays blocked."""
    gates: list[Gate] = []
    yield gates
    for g in gates:
        g.release()


def open_gated(stores: Stores, gates: list[Gate]) -> tuple[arrival.Broker, Gate]:
    gate = Gate(stores.storage())
    gates.append(gate)
    storage: Storage = gate  # type: ignore[assignment]  # read-only counters suffice
    b = arrival.connect(storage, clock=stores.clock, rng=random.Random(0))
    stores.open_brokers.append(b)
    return b, gate


def open_with_horizon(stores: Stores, horizon_s: float) -> arrival.Broker:
    b = arrival.connect(
        stores.storage(), clock=stores.clock, rng=random.Random(0), producer_horizon=horizon_s
    )
    stores.open_brokers.append(b)
    return b


def send(
    broker: arrival.Broker,
    queue: str,
    body: bytes,
    producer: tuple[str, int, int],
    *,
    mid: str | None = None,
) -> Ticket:
    """An idempotent send through the engine, as a client that retries would make it."""
    ticket = engine_of(broker).send(queue, [(mid, None, None, body)], producer)
    assert ticket is not None
    return ticket


def stored_bodies(broker: arrival.Broker, queue: str) -> list[bytes]:
    return [m.body for m in broker.peek(queue, 1000)]


# -- idempotent producer: retries ------------------------------------------------------------


@pytest.mark.parametrize("guarantee", ["exactly-once", "at-least-once"])
def test_a_retry_returns_the_original_offset_and_stores_nothing(
    broker: arrival.Broker, guarantee: str
) -> None:
    broker.create_queue("q", guarantee)
    e = engine_of(broker).register_producer("p")
    assert send(broker, "q", b"a", ("p", e, 1)).wait() == 0
    assert send(broker, "q", b"b", ("p", e, 2)).wait() == 1
    # the retries carry other bodies: only (producer, epoch, sequence) decides
    assert send(broker, "q", b"a again", ("p", e, 1)).wait() == 0
    assert send(broker, "q", b"b again", ("p", e, 2)).wait() == 1
    st = broker.stats("q")
    assert (st.stored, st.sent, st.end_offset) == (2, 2, 2)
    assert stored_bodies(broker, "q") == [b"a", b"b"]
    assert bodies(drain(broker.consumer("q", "g"))) == [b"a", b"b"]
    assert send(broker, "q", b"c", ("p", e, 3)).wait() == 2  # the sequence goes on


def test_a_retried_batch_returns_its_first_offset(broker: arrival.Broker) -> None:
    broker.create_queue("q", "exactly-once")
    e = engine_of(broker).register_producer("p")
    send(broker, "q", b"x", ("p", e, 1)).wait()
    batch = [(None, None, None, b"b0"), (None, None, None, b"b1"), (None, None, None, b"b2")]
    first = engine_of(broker).send("q", batch, ("p", e, 2))
    assert first is not None
    assert first.wait() == 1
    again = engine_of(broker).send("q", batch, ("p", e, 2))
    assert again is not None
    assert again.wait() == 1
    assert stored_bodies(broker, "q") == [b"x", b"b0", b"b1", b"b2"]


def test_a_retry_while_the_original_is_being_committed_waits_for_it(
    stores: Stores, gated: list[Gate]
) -> None:
    b, gate = open_gated(stores, gated)
    b.create_queue("q", "exactly-once")
    e = engine_of(b).register_producer("p")
    engine_of(b).flush().wait()  # the registration is stored: the next commit is the send's
    gate.hold()
    original = send(b, "q", b"a", ("p", e, 1))
    assert gate.entered.wait(GATE_WAIT_S)
    assert [(q, first) for q, first, _n, _d in gate.held[0].batches] == [("q", 0)]
    retry = send(b, "q", b"a", ("p", e, 1))
    # nothing is acknowledged before it is durable, the retry included
    assert not original.done()
    assert not retry.done()
    gate.release()
    assert original.wait(GATE_WAIT_S) == 0
    assert retry.wait(GATE_WAIT_S) == 0
    assert b.stats("q").stored == 1
    assert bodies(drain(b.consumer("q", "g"))) == [b"a"]


def test_a_retry_while_the_original_is_still_queued_waits_for_it(
    stores: Stores, gated: list[Gate]
) -> None:
    b, gate = open_gated(stores, gated)
    b.create_queue("q", "exactly-once")
    b.create_queue("other", "at-least-once")
    e = engine_of(b).register_producer("p")
    engine_of(b).flush().wait()
    gate.hold()
    busy = engine_of(b).send("other", [(None, None, None, b"keeps the writer busy")])
    assert busy is not None
    assert gate.entered.wait(GATE_WAIT_S)  # the writer is inside that commit
    original = send(b, "q", b"a", ("p", e, 1))  # queued behind it, not yet collected
    retry = send(b, "q", b"a", ("p", e, 1))
    assert not original.done()
    assert not retry.done()
    gate.release()
    assert (original.wait(GATE_WAIT_S), retry.wait(GATE_WAIT_S), busy.wait(GATE_WAIT_S)) == (
        0,
        0,
        0,
    )
    assert stored_bodies(b, "q") == [b"a"]


def test_a_retry_waiting_on_a_commit_that_fails_gets_the_error(
    stores: Stores, gated: list[Gate]
) -> None:
    b, gate = open_gated(stores, gated)
    b.create_queue("q", "exactly-once")
    e = engine_of(b).register_producer("p")
    engine_of(b).flush().wait()
    gate.hold()
    original = send(b, "q", b"a", ("p", e, 1))
    assert gate.entered.wait(GATE_WAIT_S)
    retry = send(b, "q", b"a", ("p", e, 1))
    gate.crash = "before"
    gate.release()
    with pytest.raises(StorageError):
        original.wait(GATE_WAIT_S)
    with pytest.raises(StorageError):
        retry.wait(0.5)  # today: TimeoutError, the ticket is never finished


# -- idempotent producer: bad sequences --------------------------------------------------------


def test_sequence_errors_store_nothing(broker: arrival.Broker) -> None:
    broker.create_queue("q", "exactly-once")
    broker.create_queue("r", "exactly-once")
    e = engine_of(broker).register_producer("p")
    send(broker, "q", b"a", ("p", e, 1)).wait()
    with pytest.raises(SequenceError, match="start at 1"):
        send(broker, "q", b"zero", ("p", e, 0))
    with pytest.raises(SequenceError, match=r"2\.\.3 were lost"):
        send(broker, "q", b"gap", ("p", e, 4))
    with pytest.raises(SequenceError, match="'q', not 'r'"):
        send(broker, "r", b"same seq, other queue", ("p", e, 1))
    with pytest.raises(UnknownQueue):
        send(broker, "nope", b"x", ("p", e, 2))
    assert send(broker, "q", b"b", ("p", e, 2)).wait() == 1  # no failure used a sequence
    engine_of(broker).flush().wait()
    assert stored_bodies(broker, "q") == [b"a", b"b"]
    assert broker.stats("r").stored == 0


def test_an_unregistered_producer_is_refused(broker: arrival.Broker) -> None:
    broker.create_queue("q", "exactly-once")
    for seq in (5, 1):
        with pytest.raises(DedupHorizonPassed):
            send(broker, "q", b"x", ("ghost", 1, seq))
    assert broker.stats("q").stored == 0


def test_an_invalid_producer_id_is_refused(broker: arrival.Broker) -> None:
    broker.create_queue("q", "exactly-once")
    for bad in ("", "has space", "-leading-dash", "x" * 201):
        with pytest.raises(UsageError):
            broker.producer(id=bad)
    assert broker.stats("q").stored == 0


@pytest.mark.parametrize("horizon", [0, -1.0, float("nan")])
def test_a_producer_horizon_must_be_positive(horizon: float) -> None:
    with pytest.raises(UsageError, match="producer_horizon_s"):
        arrival.connect("memory:", producer_horizon=horizon)


# -- fencing -------------------------------------------------------------------------------------


def test_opening_a_producer_id_again_fences_the_first_holder(broker: arrival.Broker) -> None:
    broker.create_queue("q", "exactly-once")
    first = broker.producer(id="x")
    assert first.send("q", b"from first") == 0
    second = broker.producer(id="x")
    with pytest.raises(ProducerFenced) as exc:
        first.send("q", b"zombie")
    assert (exc.value.kind, exc.value.name) == ("producer", "x")
    assert "fenced" in str(exc.value)
    assert "epoch" in str(exc.value)
    with pytest.raises(ProducerFenced):
        first.send_batch("q", [b"zombie 1", b"zombie 2"])
    with pytest.raises(ProducerFenced):  # and it stays fenced
        first.send("q", b"zombie again", id="z")
    assert second.send("q", b"from second") == 1
    engine_of(broker).flush().wait()
    assert stored_bodies(broker, "q") == [b"from first", b"from second"]
    assert broker.stats("q").sent == 2
    assert bodies(drain(broker.consumer("q", "g"))) == [b"from first", b"from second"]


def test_a_fenced_producer_cannot_even_retry(broker: arrival.Broker) -> None:
    broker.create_queue("q", "exactly-once")
    e1 = engine_of(broker).register_producer("p")
    send(broker, "q", b"a", ("p", e1, 1)).wait()
    e2 = engine_of(broker).register_producer("p")
    assert e2 > e1
    with pytest.raises(ProducerFenced, match=f"epoch {e1} was replaced by epoch {e2}"):
        send(broker, "q", b"a", ("p", e1, 1))
    assert send(broker, "q", b"new", ("p", e2, 1)).wait() == 1


def test_a_holder_from_before_the_horizon_is_fenced_by_a_new_one(stores: Stores) -> None:
    b = open_with_horizon(stores, 10)
    b.create_queue("q", "exactly-once")
    zombie = b.producer(id="x")
    zombie.send("q", b"old")
    stores.clock.advance(11)
    engine_of(b).flush().wait()  # the idle producer is forgotten
    fresh = b.producer(id="x")
    fresh.send("q", b"new")
    with pytest.raises(ProducerFenced):
        zombie.send("q", b"zombie")
    assert stored_bodies(b, "q") == [b"old", b"new"]


# -- crashes ----------------------------------------------------------------------------------


def test_producer_state_survives_a_crash(stores: Stores) -> None:
    b1 = stores.open()
    b1.create_queue("q", "exactly-once")
    e = engine_of(b1).register_producer("p")
    send(b1, "q", b"a", ("p", e, 1)).wait()
    send(b1, "q", b"b", ("p", e, 2)).wait()
    stores.crash(b1)

    b2 = stores.open()
    assert send(b2, "q", b"b", ("p", e, 2)).wait() == 1  # the retry after the restart
    assert send(b2, "q", b"a", ("p", e, 1)).wait() == 0
    with pytest.raises(SequenceError, match="last stored sequence is 2"):
        send(b2, "q", b"d", ("p", e, 4))
    assert send(b2, "q", b"c", ("p", e, 3)).wait() == 2
    assert bodies(drain(b2.consumer("q", "g"))) == [b"a", b"b", b"c"]
    e2 = engine_of(b2).register_producer("p")
    assert e2 > e  # epochs keep growing across the crash
    with pytest.raises(ProducerFenced):
        send(b2, "q", b"zombie", ("p", e, 4))


def test_a_send_whose_acknowledgement_was_lost_is_deduplicated_after_restart(
    stores: Stores, gated: list[Gate]
) -> None:
    b1, gate = open_gated(stores, gated)
    b1.create_queue("q", "exactly-once")
    e = engine_of(b1).register_producer("p")
    send(b1, "q", b"a", ("p", e, 1)).wait()
    gate.crash = "after"  # durable, but the producer never hears so
    with pytest.raises(StorageError):
        send(b1, "q", b"b", ("p", e, 2)).wait(GATE_WAIT_S)
    stores.crash(b1)

    b2 = stores.open()
    assert send(b2, "q", b"b", ("p", e, 2)).wait() == 1  # the client's retry
    assert stored_bodies(b2, "q") == [b"a", b"b"]


def test_a_send_that_crashed_before_its_commit_is_not_remembered(
    stores: Stores, gated: list[Gate]
) -> None:
    b1, gate = open_gated(stores, gated)
    b1.create_queue("q", "exactly-once")
    e = engine_of(b1).register_producer("p")
    send(b1, "q", b"a", ("p", e, 1)).wait()
    gate.crash = "before"
    with pytest.raises(StorageError):
        send(b1, "q", b"b", ("p", e, 2), mid="b-id").wait(GATE_WAIT_S)
    with pytest.raises(StorageError):  # the engine stops after a failed commit
        send(b1, "q", b"b", ("p", e, 2), mid="b-id")
    stores.crash(b1)

    b2 = stores.open()
    assert stored_bodies(b2, "q") == [b"a"]
    assert send(b2, "q", b"b", ("p", e, 2), mid="b-id").wait() == 1  # stored now, once
    assert send(b2, "q", b"b", ("p", e, 2), mid="b-id").wait() == 1
    assert bodies(drain(b2.consumer("q", "g"))) == [b"a", b"b"]


def test_a_registration_that_cannot_be_stored_is_refused(stores: Stores, gated: list[Gate]) -> None:
    # the fence must be durable before its epoch is handed out: a zombie must not be able
    # to write after a crash that forgot its successor
    b1, gate = open_gated(stores, gated)
    b1.create_queue("q", "exactly-once")
    gate.crash = "before"
    with pytest.raises(StorageError):
        engine_of(b1).register_producer("p")
    stores.crash(b1)

    b2 = stores.open()
    e = engine_of(b2).register_producer("p")
    assert send(b2, "q", b"a", ("p", e, 1)).wait() == 0
    assert send(b2, "q", b"a", ("p", e, 1)).wait() == 0
    assert b2.stats("q").stored == 1


def test_damaged_producer_state_stops_the_open(stores: Stores) -> None:
    b1 = stores.open()
    b1.create_queue("q", "exactly-once")
    b1.close()
    store = stores.storage()
    store.load()
    store.commit(WriteSet(producers={"p": b"\xc1 checksummed but not a state"}))
    store.close()
    for _attempt in range(2):  # the failed open closed the store: the next one may try
        with pytest.raises(StorageError, match="producer 'p'"):
            arrival.connect(stores.storage(), clock=stores.clock)


# -- the producer horizon --------------------------------------------------------------------------


def test_a_retry_after_the_producer_horizon_is_refused_with_a_clear_error(
    stores: Stores,
) -> None:
    b = open_with_horizon(stores, 10)
    b.create_queue("q", "exactly-once")
    e = engine_of(b).register_producer("p")
    send(b, "q", b"a", ("p", e, 1)).wait()
    send(b, "q", b"b", ("p", e, 2)).wait()
    stores.clock.advance(10.5)
    engine_of(b).flush().wait()  # a commit forgets idle producers
    with pytest.raises(DedupHorizonPassed) as exc:
        send(b, "q", b"b", ("p", e, 2))
    err = exc.value
    assert (err.producer, err.seq, err.horizon_s) == ("p", 2, 10)
    msg = str(err)
    assert "'p'" in msg
    assert "sequence 2" in msg
    assert "10 s" in msg
    assert "Check the queue for the message's id" in msg  # what to do next
    assert not err.retriable
    assert stored_bodies(b, "q") == [b"a", b"b"]


def test_the_horizon_counts_from_the_last_send(stores: Stores) -> None:
    b = open_with_horizon(stores, 10)
    b.create_queue("q", "exactly-once")
    e = engine_of(b).register_producer("p")
    send(b, "q", b"a", ("p", e, 1)).wait()
    stores.clock.advance(6)
    send(b, "q", b"b", ("p", e, 2)).wait()
    stores.clock.advance(6)  # 12 s after the first send, 6 s after the last
    engine_of(b).flush().wait()
    assert send(b, "q", b"a", ("p", e, 1)).wait() == 0
    stores.clock.advance(4)  # exactly the horizon after the last send: still kept
    engine_of(b).flush().wait()
    assert send(b, "q", b"b", ("p", e, 2)).wait() == 1
    assert b.stats("q").stored == 2


def test_the_horizon_applies_to_state_restored_after_a_restart(stores: Stores) -> None:
    b1 = open_with_horizon(stores, 10)
    b1.create_queue("q", "exactly-once")
    e = engine_of(b1).register_producer("p")
    send(b1, "q", b"a", ("p", e, 1)).wait()
    send(b1, "q", b"b", ("p", e, 2)).wait()
    b1.close()
    stores.clock.advance(11)  # the broker was down past the horizon

    b2 = open_with_horizon(stores, 10)
    engine_of(b2).flush().wait()
    with pytest.raises(DedupHorizonPassed):
        send(b2, "q", b"b", ("p", e, 2))
    b2.close()

    b3 = open_with_horizon(stores, 10)  # the deletion itself was stored
    with pytest.raises(DedupHorizonPassed):
        send(b3, "q", b"b", ("p", e, 2))
    assert b3.stats("q").stored == 2


def test_a_retry_of_the_first_send_after_the_horizon_is_not_stored_twice(
    stores: Stores,
) -> None:
    b = open_with_horizon(stores, 10)
    b.create_queue("q", "exactly-once")
    e = engine_of(b).register_producer("p")
    send(b, "q", b"a", ("p", e, 1)).wait()
    stores.clock.advance(11)
    engine_of(b).flush().wait()
    with pytest.raises(DedupHorizonPassed):
        send(b, "q", b"a", ("p", e, 1)).wait()
    assert b.stats("q").stored == 1


def test_an_idle_producer_can_send_new_messages_after_the_horizon(stores: Stores) -> None:
    b = open_with_horizon(stores, 10)
    b.create_queue("q", "exactly-once")
    p = b.producer(id="weekly")
    assert p.send("q", b"week 1") == 0
    stores.clock.advance(11)
    engine_of(b).flush().wait()
    assert p.send("q", b"week 2") == 1
    assert stored_bodies(b, "q") == [b"week 1", b"week 2"]


# -- the public producer ------------------------------------------------------------------------


def test_at_most_once_sends_use_no_sequence_number(broker: arrival.Broker) -> None:
    broker.create_queue("fast", "at-most-once")
    broker.create_queue("q", "exactly-once")
    for producer in (broker.producer(id="mixed"), broker.producer()):
        assert producer.send("fast", b"lossy 1") is None
        assert producer.send_batch("fast", [b"lossy 2", b"lossy 3"]) is None
        # had the lossy sends taken sequences 1-3, this one would be refused as a gap
        producer.send("q", b"durable")
        producer.send("fast", b"lossy 4")
        producer.send("q", b"durable")
    assert broker.stats("q").stored == 4


def test_threads_sharing_a_producer_never_make_a_gap(broker: arrival.Broker) -> None:
    broker.create_queue("q", "exactly-once")
    p = broker.producer(id="shared")
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(25):
                p.send("q", b"%d-%d" % (t, i))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    got = stored_bodies(broker, "q")
    assert sorted(got) == sorted(b"%d-%d" % (t, i) for t in range(4) for i in range(25))


# -- message-id deduplication ------------------------------------------------------------------


def test_an_id_sent_twice_to_an_exactly_once_queue_is_stored_once(broker: arrival.Broker) -> None:
    broker.create_queue("q", "exactly-once")
    p = broker.producer()
    assert p.send("q", b"first", id="pay-1") == 0
    assert p.send("q", b"other", id="pay-2") == 1
    assert broker.producer().send("q", b"second copy", id="pay-1") == 0  # another producer
    assert p.send("q", b"third copy", id="pay-1") == 0
    st = broker.stats("q")
    assert (st.stored, st.sent) == (2, 2)
    got = drain(broker.consumer("q", "g"))
    assert [(m.id, m.body) for m in got] == [("pay-1", b"first"), ("pay-2", b"other")]


def test_messages_without_an_id_are_never_deduplicated(broker: arrival.Broker) -> None:
    broker.create_queue("q", "exactly-once")
    p = broker.producer()
    assert [p.send("q", b"same") for _ in range(3)] == [0, 1, 2]


def test_duplicates_within_one_batch_are_stored_once(broker: arrival.Broker) -> None:
    broker.create_queue("q", "exactly-once")
    p = broker.producer()
    first = p.send_batch(
        "q",
        [
            arrival.Envelope(b"a", id="a"),
            arrival.Envelope(b"b", id="b"),
            arrival.Envelope(b"a copy", id="a"),
            arrival.Envelope(b"no id"),
            arrival.Envelope(b"b copy", id="b"),
        ],
    )
    assert first == 0
    assert stored_bodies(broker, "q") == [b"a", b"b", b"no id"]
    # a batch of only known ids stores nothing and returns the first original's offset
    assert p.send_batch("q", [arrival.Envelope(b"x", id="b"), arrival.Envelope(b"y", id="a")]) == 1
    # a known id first: the result is the original's offset; the new ones follow the end
    assert p.send_batch("q", [arrival.Envelope(b"x", id="a"), arrival.Envelope(b"c", id="c")]) == 0
    assert stored_bodies(broker, "q") == [b"a", b"b", b"no id", b"c"]
    assert [m.id for m in drain(broker.consumer("q", "g"))] == ["a", "b", "q:2", "c"]


def test_an_at_least_once_queue_without_dedup_stores_every_copy(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    p = broker.producer()
    assert [p.send("q", b"x", id="same") for _ in range(2)] == [0, 1]
    assert len(drain(broker.consumer("q", "g"))) == 2


def test_an_at_least_once_queue_with_dedup_stores_one(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once", dedup=True)
    p = broker.producer()
    assert [p.send("q", b"x", id="same") for _ in range(2)] == [0, 0]
    assert [m.body for m in drain(broker.consumer("q", "g"))] == [b"x"]


def test_ids_are_per_queue(broker: arrival.Broker) -> None:
    broker.create_queue("q", "exactly-once")
    broker.create_queue("r", "exactly-once")
    p = broker.producer()
    assert p.send("q", b"x", id="same") == 0
    assert p.send("r", b"x", id="same") == 0
    assert (broker.stats("q").stored, broker.stats("r").stored) == (1, 1)


def test_ids_survive_a_crash(stores: Stores) -> None:
    b1 = stores.open()
    b1.create_queue("q", "exactly-once")
    p = b1.producer()
    p.send("q", b"a", id="a")
    p.send_batch("q", [arrival.Envelope(b"b", id="b"), arrival.Envelope(b"c", id="c")])
    stores.crash(b1)

    b2 = stores.open()
    p2 = b2.producer()
    assert [p2.send("q", b"again", id=mid) for mid in "cab"] == [2, 0, 1]
    assert p2.send("q", b"d", id="d") == 3
    assert stored_bodies(b2, "q") == [b"a", b"b", b"c", b"d"]


def test_ids_of_a_send_lost_in_a_crash_are_not_remembered(
    stores: Stores, gated: list[Gate]
) -> None:
    b1, gate = open_gated(stores, gated)
    b1.create_queue("q", "exactly-once")
    b1.producer().send("q", b"a", id="a")
    gate.crash = "before"
    with pytest.raises(StorageError):
        b1.producer().send("q", b"b", id="b", timeout=GATE_WAIT_S)
    stores.crash(b1)

    b2 = stores.open()
    assert b2.producer().send("q", b"b", id="b") == 1
    assert stored_bodies(b2, "q") == [b"a", b"b"]


def _consume_and_trim(b: arrival.Broker, c: arrival.Consumer) -> None:
    """Ack what ``c`` can get and send a filler so the acked batches can be deleted."""
    drain(c)
    b.producer().send("q", b"filler")  # the newest batch is always kept
    drain(c)
    engine_of(b).flush().wait()
    engine_of(b).flush().wait()


def test_an_id_expires_only_after_the_window_and_the_deletion(stores: Stores) -> None:
    b = stores.open()
    clock = stores.clock
    b.create_queue("q", "at-least-once", dedup=True, dedup_window=10, retention=0)
    p = b.producer()
    c = b.consumer("q", "g")
    assert p.send("q", b"a", id="a") == 0
    _consume_and_trim(b, c)
    assert b.stats("q").first_offset > 0  # the message itself was deleted
    clock.advance(9.5)
    engine_of(b).flush().wait()  # the writer forgets expired ids as it commits
    engine_of(b).flush().wait()
    assert p.send("q", b"a too soon", id="a") == 0  # deleted, but within the window
    clock.advance(1)
    engine_of(b).flush().wait()
    assert p.send("q", b"a later", id="a") == 2  # a new message now
    got = drain(c)
    assert [(m.id, m.body) for m in got] == [("a", b"a later")]
    assert p.send("q", b"a again", id="a") == 2  # and the new copy is deduplicated


def test_an_id_of_a_retained_message_does_not_expire(stores: Stores) -> None:
    b = stores.open()
    clock = stores.clock
    b.create_queue("q", "at-least-once", dedup=True, dedup_window=10)
    p = b.producer()
    assert p.send("q", b"a", id="a") == 0
    c = b.consumer("q", "g")  # a group that never acks it: the message is retained
    clock.advance(100)
    engine_of(b).flush().wait()
    engine_of(b).flush().wait()
    assert p.send("q", b"a copy", id="a") == 0
    assert [m.body for m in drain(c)] == [b"a"]


def test_an_expired_id_stays_forgotten_after_a_restart(stores: Stores) -> None:
    b1 = stores.open()
    b1.create_queue("q", "at-least-once", dedup=True, dedup_window=10)
    p = b1.producer()
    c = b1.consumer("q", "g")
    p.send("q", b"a", id="a")
    _consume_and_trim(b1, c)
    stores.clock.advance(10.5)
    engine_of(b1).flush().wait()  # commits the trim of the expired id
    assert p.send("q", b"fresh", id="fresh") == 2
    stores.crash(b1)

    b2 = stores.open()
    p2 = b2.producer()
    assert p2.send("q", b"a new", id="a") == 3  # not swallowed by a stale stored id
    assert p2.send("q", b"fresh copy", id="fresh") == 2  # a stored id still dedups
    assert [m.body for m in drain(b2.consumer("q", "g"))] == [b"fresh", b"a new"]


def test_replayed_dead_letters_are_not_swallowed_by_dedup(broker: arrival.Broker) -> None:
    broker.create_queue("q", "exactly-once", backoff=NO_BACKOFF)
    p = broker.producer()
    p.send("q", b"pay", id="pay-1")
    c = broker.consumer("q", "g")
    msg = c.receive(timeout=0)
    assert msg is not None
    msg.reject("downstream was down")
    dlq = broker.dead_letters("q")
    assert [d.id for d in dlq.list()] == ["pay-1"]
    assert [d.id for d in dlq.replay()] == ["pay-1"]
    again = c.receive(timeout=0)
    assert again is not None
    assert (again.id, again.body) == ("pay-1", b"pay")
    again.ack()
    assert dlq.list() == []
    # the producer's own retry is still deduplicated: against the retained replayed copy
    assert p.send("q", b"pay", id="pay-1") == 1
    assert c.receive(timeout=0) is None


@pytest.mark.parametrize(
    "fields",
    [{"id": "pay-\ud800"}, {"key": "\udc80"}, {"headers": {"h": "\ud800"}}],
    ids=["id", "key", "header"],
)
def test_a_message_that_cannot_be_encoded_leaves_a_dedup_queue_intact(
    stores: Stores, fields: dict[str, object]
) -> None:
    b = stores.open()
    b.create_queue("q", "exactly-once")
    c = b.consumer("q", "g")  # joined before: it starts at offset 0
    p = b.producer()
    for _ in range(2):  # refused each time: never acknowledged as a duplicate
        with pytest.raises((UsageError, ValueError)):
            p.send("q", b"bad", **fields)  # type: ignore[arg-type]
    assert p.send("q", b"ok", id="ok") == 0
    got = c.receive(timeout=0)
    assert got is not None
    assert got.body == b"ok"
    assert b.stats("q").sent == 1


def test_a_transaction_with_a_message_that_cannot_be_encoded_stores_nothing(
    broker: arrival.Broker,
) -> None:
    broker.create_queue("a", "exactly-once")
    broker.create_queue("b", "exactly-once")
    tx = broker.transaction("t")
    tx.send("a", b"part one")
    with pytest.raises(UsageError, match="not valid Unicode"):  # refused at once
        tx.send("b", b"part two", key="\udc80")
    tx.abort()
    # and the engine refuses a transaction holding one (as a remote client could send)
    engine = engine_of(broker)
    epoch = engine.begin_transaction("t2")
    sends = [("a", [(0.0, None, None, None, b"part one")])]
    sends.append(("b", [(0.0, None, "\udc80", None, b"part two")]))
    with pytest.raises((UsageError, ValueError)):
        engine.commit_transaction("t2", epoch, engine.clock.now(), 60.0, sends, [])
    engine.flush().wait()
    assert broker.stats("a").stored == 0
    assert broker.stats("b").stored == 0


# -- exactly-once acks are confirmed ------------------------------------------------------


def test_an_exactly_once_ack_is_durable_when_it_returns(stores: Stores) -> None:
    b1 = stores.open()
    b1.create_queue("q", "exactly-once")
    b1.producer().send_batch("q", [b"0", b"1", b"2"])
    c = b1.consumer("q", "g")
    m0, _m1, m2 = c.receive_batch(3, timeout=0)
    m0.ack()
    c.ack_batch([m2])
    stores.crash(b1)  # at once: no flush, no linger

    b2 = stores.open()
    assert bodies(drain(b2.consumer("q", "g"))) == [b"1"]  # only the unacked one comes back


def test_an_exactly_once_ack_waits_for_its_commit(stores: Stores, gated: list[Gate]) -> None:
    b1, gate = open_gated(stores, gated)
    b1.create_queue("q", "exactly-once")
    b1.producer().send("q", b"x")
    msg = b1.consumer("q", "g").receive(timeout=0)
    assert msg is not None
    gate.hold()
    returned = threading.Event()

    def ack() -> None:
        msg.ack()
        returned.set()

    t = threading.Thread(target=ack)
    t.start()
    assert gate.entered.wait(GATE_WAIT_S)
    assert not returned.wait(0.2)  # the writer is held: the ack must not have returned
    gate.release()
    t.join(GATE_WAIT_S)
    assert returned.is_set()
    stores.crash(b1)

    b2 = stores.open()
    assert b2.consumer("q", "g").receive(timeout=0) is None


def test_engine_acks_return_a_ticket_only_on_exactly_once_queues(broker: arrival.Broker) -> None:
    broker.create_queue("eo", "exactly-once")
    broker.create_queue("alo", "at-least-once")
    for q in ("eo", "alo"):
        broker.producer().send(q, b"x")
        msg = broker.consumer(q, "g").receive(timeout=0)
        assert msg is not None
        ticket = engine_of(broker).ack(msg._member, msg._epoch, [(msg.offset, msg.attempt)])
        if q == "eo":
            assert ticket is not None
            ticket.wait(GATE_WAIT_S)
        else:
            assert ticket is None


# -- describe ------------------------------------------------------------------------------------


def test_describe_an_exactly_once_queue_names_its_dedup_limits(stores: Stores) -> None:
    b = open_with_horizon(stores, 3600)
    b.create_queue("q", "exactly-once", dedup_window=120)
    d = b.describe("q")
    assert d.limits["producer_state"] == "kept 3600 s after a producer's last send"
    assert d.limits["dedup_window"] == "120 s"
    text = str(d)
    assert "producer_state: kept 3600 s" in text
    assert "dedup_window: 120 s" in text
    assert any("idempotent producers" in m for m in d.mechanism)
    assert any("at least 120 s after it was stored" in m for m in d.mechanism)


def test_describe_names_dedup_only_where_the_queue_has_it(broker: arrival.Broker) -> None:
    broker.create_queue("plain", "at-least-once")
    broker.create_queue("ids", "at-least-once", dedup=True, dedup_window=60)
    plain = broker.describe("plain")
    assert "dedup_window" not in plain.limits
    assert "producer_state" not in plain.limits
    assert broker.describe("ids").limits["dedup_window"] == "60 s"


def test_the_default_producer_horizon_is_a_week(broker: arrival.Broker) -> None:
    broker.create_queue("q", "exactly-once")
    assert broker.describe("q").limits["producer_state"] == (
        "kept 604800 s after a producer's last send"
    )


# -- the store underneath -------------------------------------------------------------------------


def test_producer_state_is_committed_with_the_send(stores: Stores, gated: list[Gate]) -> None:
    b, gate = open_gated(stores, gated)
    b.create_queue("q", "exactly-once")
    e = engine_of(b).register_producer("p")
    engine_of(b).flush().wait()
    gate.hold()
    ticket = send(b, "q", b"a", ("p", e, 1), mid="a")
    assert gate.entered.wait(GATE_WAIT_S)
    (ws,) = gate.held
    gate.release()
    ticket.wait(GATE_WAIT_S)
    assert [q for q, *_ in ws.batches] == ["q"]
    assert set(ws.producers) == {"p"}  # one atomic write: batch, producer state and id
    assert [(q, first, last) for q, first, last, _ts, _data in ws.ids] == [("q", 0, 0)]
    assert msgspec.msgpack.decode(ws.ids[0][4]) == [["a"], [0]]
    state = ws.producers["p"]
    assert state is not None
    epoch, last_seq, _last_send, recent = msgspec.msgpack.decode(state)
    assert (epoch, last_seq, recent) == (e, 1, [[1, "q", 0]])


def test_a_producer_behind_the_brokers_sequence_opens_a_new_epoch(stores: Stores) -> None:
    """Sends numbered but never stored (they failed on a broken disk, or a crashed broker
    lost them before storing) leave the broker's sequence behind the producer's. The
    next send gets a gap, which says it was not stored either: the producer opens a new
    epoch and sends it again, instead of failing that send and every one after it."""
    b = stores.open()
    b.create_queue("q", "exactly-once")
    p = b.producer("p1")
    assert p.send("q", b"a", id="a") == 0
    first_epoch = p._core.epoch
    p._core.seq += 3  # three sends numbered that the broker never stored
    assert p.send("q", b"b", id="b") == 1
    assert p._core.epoch > first_epoch
    assert p.send("q", b"c", id="c") == 2
    assert bodies(drain(b.consumer("q", "g"))) == [b"a", b"b", b"c"]


def test_the_gap_of_a_broker_refused_sequence_is_marked() -> None:
    from arrival.semantics.dedup import ProducerTable

    t = ProducerTable(7 * 86400.0)
    epoch = t.register("p", 0.0)
    t.record("p", epoch, 1, "q", 0, 0.0)
    with pytest.raises(SequenceError) as gap:
        t.check("p", epoch, 3, "q")
    assert gap.value.gap
    with pytest.raises(SequenceError) as other:
        t.check("p", epoch, 0, "q")
    assert not other.value.gap


def test_threads_that_find_the_gap_at_once_share_one_new_epoch(stores: Stores) -> None:
    b = stores.open()
    b.create_queue("q", "exactly-once")
    p = b.producer("p1")
    p.send("q", b"first", id="first")
    p._core.seq += 5
    errors: list[BaseException] = []

    def send(t: int) -> None:
        try:
            for n in range(20):
                p.send("q", b"x", id=f"t{t}-{n}")
        except BaseException as exc:  # noqa: BLE001 - the test's finding
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    ids = [m.id for m in b.peek("q", 1000)]
    assert len(ids) == len(set(ids)) == 1 + 8 * 20
