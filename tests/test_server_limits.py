"""Per-consumer in-flight limit on the server: a consumer holding ``max_in_flight``
unsettled messages gets no more until it settles some (or its leases expire), while the
rest of its group keeps consuming; nothing is lost or duplicated meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

import arrival
from arrival.errors import UsageError
from arrival.server import Server
from arrival.storage.memory import MemoryStorage
from inprocess_server import InProcessServer

LIMIT = 5


@pytest.fixture
def server() -> Iterator[InProcessServer]:
    s = InProcessServer(MemoryStorage(), max_in_flight=LIMIT)
    yield s
    s.stop()


@pytest.fixture
def broker(server: InProcessServer) -> Iterator[arrival.Broker]:
    with arrival.connect(server.url) as b:
        b.create_queue("q", "at-least-once", ack_timeout=60)
        b.producer().send_batch("q", [str(i).encode() for i in range(20)])
        yield b


def test_a_consumer_gets_at_most_its_limit_and_the_group_gets_the_rest(
    broker: arrival.Broker,
) -> None:
    slow = broker.consumer("q", "g")
    held = slow.receive_batch(100, timeout=1)
    assert len(held) == LIMIT
    start = time.monotonic()
    assert slow.receive_batch(100, timeout=0.3) == []  # waits its timeout, gets nothing
    assert time.monotonic() - start >= 0.25
    fast = broker.consumer("q", "g")
    rest: list[arrival.Message] = []
    while len(rest) < 20 - LIMIT:
        got = fast.receive_batch(100, timeout=1)
        assert got, "the rest of the group was starved"
        fast.ack_batch(got)
        rest += got
    bodies = sorted(int(m.body) for m in [*held, *rest])
    assert bodies == list(range(20))  # nothing lost, nothing twice


def test_settling_makes_room(broker: arrival.Broker) -> None:
    c = broker.consumer("q", "g")
    held = c.receive_batch(100, timeout=1)
    assert len(held) == LIMIT
    held[0].ack()
    held[1].nack(0.0)  # comes back, and counts as settled
    more = c.receive_batch(100, timeout=1)
    assert len(more) == 2


def test_a_waiting_receive_wakes_when_the_consumer_settles(broker: arrival.Broker) -> None:
    c = broker.consumer("q", "g")
    held = c.receive_batch(100, timeout=1)
    out: list[list[arrival.Message]] = []
    t = threading.Thread(target=lambda: out.append(c.receive_batch(100, timeout=5)))
    t.start()
    time.sleep(0.2)
    assert not out  # still waiting: the consumer holds its limit
    c.ack_batch(held[:3])
    t.join(5)
    assert len(out) == 1
    assert len(out[0]) == 3


def test_expired_leases_free_the_room() -> None:
    server = InProcessServer(MemoryStorage(), max_in_flight=LIMIT)
    try:
        with arrival.connect(server.url) as b:
            b.create_queue("q", "at-least-once", ack_timeout=0.2)
            b.producer().send_batch("q", [str(i).encode() for i in range(10)])
            c = b.consumer("q", "g")
            assert len(c.receive_batch(100, timeout=1)) == LIMIT
            time.sleep(0.3)  # every lease expired: the consumer holds nothing now
            again = c.receive_batch(100, timeout=1)
            assert len(again) == LIMIT
    finally:
        server.stop()


def test_max_in_flight_must_be_positive() -> None:
    from arrival._backend import LocalBackend
    from arrival.engine import Engine

    backend = LocalBackend(Engine(MemoryStorage()), "memory:")
    try:
        with pytest.raises(UsageError, match="max_in_flight"):
            Server(backend, max_in_flight=0)
    finally:
        backend.engine.close()
