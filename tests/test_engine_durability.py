"""The engine's durability rules, checked with stores that stall or fail on command.

1. Nothing is acknowledged, or visible to a consumer, before its commit returned.
2. Concurrent sends share commits (group commit).
3. A failed commit fails the sends it held, and the broker refuses further work.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest

import arrival
from arrival.errors import ClosedError, StorageError
from arrival.storage.base import WriteSet
from arrival.storage.memory import MemoryStorage

WAIT_S = 5.0


class GatedStorage(MemoryStorage):
    """A memory store whose commits holding batches wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()

    def commit(self, ws: WriteSet) -> None:
        if ws.batches and not self.gate.is_set():
            self.waiting.set()
            assert self.gate.wait(WAIT_S), "the test never opened the gate"
        super().commit(ws)


class SlowStorage(MemoryStorage):
    """Every durable commit takes ``delay_s``, like a slow fsync."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.batches_per_commit: list[int] = []

    def commit(self, ws: WriteSet) -> None:
        if ws.batches:
            self.batches_per_commit.append(len(ws.batches))
            time.sleep(self.delay_s)
        super().commit(ws)


class FailingStorage(MemoryStorage):
    """Commits fail once ``broken`` is set, as a disk returning EIO on fsync would."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    def commit(self, ws: WriteSet) -> None:
        if self.broken and ws.batches:
            raise OSError(5, "Input/output error")
        super().commit(ws)


def test_send_returns_and_becomes_visible_only_after_its_commit() -> None:
    store = GatedStorage()
    with arrival.connect(store) as broker:
        broker.create_queue("q", "at-least-once")
        consumer = broker.consumer("q", "g")
        store.gate.clear()
        returned = threading.Event()
        sender = threading.Thread(
            target=lambda: (broker.producer().send("q", b"m"), returned.set())
        )
        sender.start()
        assert store.waiting.wait(WAIT_S)
        # the commit is in progress: the send has not returned, nobody can see the message
        assert not returned.wait(0.2)
        assert consumer.receive(timeout=0.1) is None
        assert broker.peek("q") == []
        store.gate.set()
        assert returned.wait(WAIT_S)
        sender.join(WAIT_S)
        msg = consumer.receive(timeout=WAIT_S)
        assert msg is not None
        assert msg.body == b"m"


def test_concurrent_sends_share_commits() -> None:
    store = SlowStorage(delay_s=0.02)
    threads, per_thread = 8, 5
    with arrival.connect(store) as broker:
        broker.create_queue("q", "at-least-once")
        before = broker.info().fsyncs
        barrier = threading.Barrier(threads)

        def send() -> None:
            p = broker.producer()
            barrier.wait()
            for i in range(per_thread):
                p.send("q", f"{i}".encode())

        workers = [threading.Thread(target=send) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(WAIT_S * 4)
        sends = threads * per_thread
        fsyncs = broker.info().fsyncs - before
        assert broker.stats("q").end_offset == sends
        # each thread waits for its send before the next, so commits carry up to 8 sends;
        # one commit per send would be 40
        assert fsyncs <= sends // 2, (fsyncs, store.batches_per_commit)
        assert max(store.batches_per_commit) > 1


def test_a_failed_commit_fails_its_sends_and_stops_the_broker() -> None:
    store = FailingStorage()
    broker = arrival.connect(store)
    try:
        broker.create_queue("q", "at-least-once")
        producer = broker.producer()
        assert producer.send("q", b"kept") == 0
        store.broken = True
        with pytest.raises(StorageError, match="Input/output error"):
            producer.send("q", b"lost")
        # the broker refuses further work, with the cause and what to do
        with pytest.raises(StorageError, match="storage failure"):
            producer.send("q", b"after")
        with pytest.raises(StorageError, match="reopen"):
            broker.consumer("q", "g")
    finally:
        broker.close()
    # what was acknowledged is there; what failed is not
    store.broken = False
    with arrival.connect(store) as again:
        got = again.consumer("q", "g").receive_batch(10, timeout=0)
        assert [m.body for m in got] == [b"kept"]


def test_send_after_close_raises_closed() -> None:
    broker = arrival.connect("memory:")
    broker.create_queue("q", "at-least-once")
    broker.close()
    with pytest.raises(ClosedError, match="closed"):
        broker.producer().send("q", b"x")


def test_the_message_cache_is_bounded_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded batches are cached up to CACHE_MESSAGES, kept count of as they come and go
    (never re-added up per insert), and re-read from the store when evicted."""
    from arrival import engine as engine_module

    monkeypatch.setattr(engine_module, "CACHE_MESSAGES", 50)
    with arrival.connect("memory:") as broker:
        broker.create_queue("q", "at-least-once")
        producer = broker.producer()
        for i in range(40):
            producer.send_batch("q", [f"{i}-{j}".encode() for j in range(5)])
        e = broker.engine
        q = e._queues["q"]
        assert e.cached == sum(len(b.records) for b in q.cache.values())
        assert e.cached <= 50
        # evicted batches come back from the store, in order
        got = broker.consumer("q", "g").receive_batch(1000, timeout=0)
        assert [m.body for m in got] == [f"{i}-{j}".encode() for i in range(40) for j in range(5)]
        assert e.cached == sum(len(b.records) for b in q.cache.values())
        assert e.cached <= 50


def test_the_message_cache_is_bounded_in_bytes_for_large_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Large messages fill CACHE_BYTES long before CACHE_MESSAGES: the cache holds
    a byte budget of them, whatever their count."""
    from arrival import engine as engine_module

    monkeypatch.setattr(engine_module, "CACHE_BYTES", 64 << 10)
    body = b"z" * (16 << 10)
    with arrival.connect("memory:") as broker:
        broker.create_queue("q", "at-least-once")
        producer = broker.producer()
        for _ in range(40):
            producer.send("q", body)
        e = broker.engine
        q = e._queues["q"]
        assert e.cached_bytes == sum(b.size for b in q.cache.values())
        assert e.cached_bytes <= 64 << 10
        assert e.cached < 10  # far below CACHE_MESSAGES
        got = broker.consumer("q", "g").receive_batch(100, timeout=0)
        assert [m.body for m in got] == [body] * 40  # evicted ones are re-read
        assert e.cached_bytes == sum(b.size for b in q.cache.values())
        assert e.cached_bytes <= 64 << 10


def test_all_queues_share_one_cache_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker with many queues holds no more decoded messages than with one: the
    oldest cached batch of any queue makes room."""
    from arrival import engine as engine_module

    monkeypatch.setattr(engine_module, "CACHE_MESSAGES", 100)
    with arrival.connect("memory:") as broker:
        producer = broker.producer()
        for n in range(20):
            broker.create_queue(f"q{n}", "at-least-once")
            producer.send_batch(f"q{n}", [f"{n}-{j}".encode() for j in range(10)])
        e = broker.engine
        per_queue = {name: len(q.cache) for name, q in e._queues.items()}
        assert e.cached <= 100
        assert e.cached == sum(len(b.records) for q in e._queues.values() for b in q.cache.values())
        assert per_queue["q0"] == 0
        assert per_queue["q19"] == 1
        for n in (0, 19):  # evicted or not, every queue reads back whole
            got = broker.consumer(f"q{n}", "g").receive_batch(100, timeout=0)
            assert [m.body for m in got] == [f"{n}-{j}".encode() for j in range(10)]
        assert e.cached <= 100


def test_retention_keeps_messages_then_deletes_them_with_bounded_bookkeeping() -> None:
    from arrival.testing import FakeClock

    clock = FakeClock()
    with arrival.connect("memory:", clock=clock) as broker:
        broker.create_queue("q", "at-least-once", retention=60.0)
        producer = broker.producer()
        consumer = broker.consumer("q", "g")
        for i in range(300):
            producer.send("q", f"{i}".encode())
            msg = consumer.receive(timeout=WAIT_S)
            assert msg is not None
            msg.ack()
            broker.engine.flush().wait()
            clock.advance(0.1)  # 30 s in all, many commits per second of clock
        q = broker.engine._queues["q"]
        assert len(q.floor_times) <= 31  # one entry per second of clock, not per commit
        # acked, but within retention: a new group still finds them
        assert broker.peek("q", 1)[0].offset == 0
        clock.advance(120)
        broker.engine.flush().wait()
        broker.engine.flush().wait()
        # past retention: deleted (the floor's time is noted once a second, so the last
        # second's messages may wait one more retention period: kept longer, never shorter)
        assert broker.peek("q", 1)[0].offset >= 290
        clock.advance(120)
        broker.engine.flush().wait()
        broker.engine.flush().wait()
        # all gone but the newest batch, which records where the log ends
        assert broker.peek("q", 1)[0].offset == 299


@pytest.mark.parametrize("damage", ["1.5", "'seven'", "-3"])
def test_a_damaged_batch_index_is_refused_as_corrupt_data(tmp_path: Path, damage: str) -> None:
    # what a flipped bit in the database file can leave: the index is checked on open,
    # never trusted into the offset arithmetic
    import sqlite3

    from arrival.errors import CorruptData
    from arrival.storage.sqlite import DB_NAME

    data = tmp_path / "data"
    with arrival.connect(str(data)) as broker:
        broker.create_queue("q", "at-least-once")
        broker.producer().send_batch("q", [b"a", b"b"])
        broker.producer().send("q", b"c")
    column = "count" if damage == "-3" else "first"
    with contextlib.closing(sqlite3.connect(data / DB_NAME)) as db:
        db.execute(f"UPDATE batches SET {column} = {damage} WHERE first = 0")
        db.commit()
    with pytest.raises(CorruptData, match="index of queue 'q' is damaged"):
        arrival.connect(str(data))
