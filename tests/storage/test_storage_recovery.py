"""Recovery through the public API over real SQLite: crash, reopen, and what survives.

``broker.engine.abandon()`` stops a broker as SIGKILL would: nothing pending is
committed, the store is closed without a final flush. Reopening is
``arrival.connect(path)`` on the same directory.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

import arrival
from arrival.errors import CorruptData, DataDirectoryInUse
from arrival.storage.memory import MemoryStorage
from arrival.storage.sqlite import DB_NAME

RECEIVE_S = 2.0  # generous: a receive returns as soon as a message is there


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@contextlib.contextmanager
def connected(path: Path | str) -> Iterator[arrival.Broker]:
    broker = arrival.connect(str(path))
    try:
        yield broker
    finally:
        broker.close()  # a no-op after abandon()


def drain(consumer: arrival.Consumer, *, ack: bool = True) -> list[arrival.Message]:
    """Everything the consumer gets until the queue is quiet."""
    out = []
    while (msg := consumer.receive(timeout=0.2)) is not None:
        out.append(msg)
        if ack:
            msg.ack()
    return out


def test_every_returned_send_is_delivered_after_a_crash(data_dir: Path) -> None:
    sent: dict[int, bytes] = {}
    with connected(data_dir) as broker:
        broker.create_queue("orders", "at-least-once")
        producer = broker.producer()
        for i in range(60):
            offset = producer.send("orders", b"order-%d" % i, key=f"k{i % 4}")
            assert isinstance(offset, int)
            sent[offset] = b"order-%d" % i
        first = producer.send_batch("orders", [b"batch-%d" % i for i in range(40)])
        assert first == 60
        sent.update({first + i: b"batch-%d" % i for i in range(40)})
        broker.engine.abandon()
        assert broker.engine.closed
    with connected(data_dir) as broker:
        got = drain(broker.consumer("orders", "billing"))
        assert {m.offset: m.body for m in got} == sent
        assert len(got) == 100  # no duplicates either
        assert all(m.attempt == 1 for m in got)


def test_acked_messages_are_not_redelivered_after_a_clean_close(data_dir: Path) -> None:
    with connected(data_dir) as broker:
        broker.create_queue("q", "at-least-once")
        broker.producer().send_batch("q", [b"m%d" % i for i in range(10)])
        consumer = broker.consumer("q", "g")
        acked = []
        for _ in range(6):
            msg = consumer.receive(timeout=RECEIVE_S)
            assert msg is not None
            msg.ack()
            acked.append(msg.offset)
        assert acked == [0, 1, 2, 3, 4, 5]
    with connected(data_dir) as broker:
        got = drain(broker.consumer("q", "g"))
        assert [(m.offset, m.body, m.attempt) for m in got] == [
            (i, b"m%d" % i, 1) for i in range(6, 10)
        ]
        # another group was never served: it gets everything
        assert [m.offset for m in drain(broker.consumer("q", "other"))] == list(range(10))


def test_acks_made_durable_survive_a_crash(data_dir: Path) -> None:
    with connected(data_dir) as broker:
        broker.create_queue("q", "at-least-once")
        broker.producer().send_batch("q", [b"m%d" % i for i in range(5)])
        consumer = broker.consumer("q", "g")
        for _ in range(3):
            msg = consumer.receive(timeout=RECEIVE_S)
            assert msg is not None
            msg.ack()
        broker.engine.flush().wait(RECEIVE_S)
        broker.engine.abandon()
    with connected(data_dir) as broker:
        assert [m.offset for m in drain(broker.consumer("q", "g"))] == [3, 4]


def test_an_unacked_message_is_redelivered_after_a_clean_close(data_dir: Path) -> None:
    with connected(data_dir) as broker:
        broker.create_queue("q", "at-least-once")
        broker.producer().send("q", b"payload", key="k", headers={"h": "v"}, id="msg-1")
        msg = broker.consumer("q", "g").receive(timeout=RECEIVE_S)
        assert msg is not None
        assert msg.attempt == 1
        # no ack: close() releases the lease
    with connected(data_dir) as broker:
        msg = broker.consumer("q", "g").receive(timeout=RECEIVE_S)
        assert msg is not None
        assert (msg.offset, msg.body, msg.key, msg.headers, msg.id) == (
            0,
            b"payload",
            "k",
            {"h": "v"},
            "msg-1",
        )
        assert msg.attempt == 2
        msg.ack()
    with connected(data_dir) as broker:
        assert broker.consumer("q", "g").receive(timeout=0.2) is None


def test_an_unacked_message_is_redelivered_after_a_crash(data_dir: Path) -> None:
    with connected(data_dir) as broker:
        broker.create_queue("q", "at-least-once")
        broker.producer().send_batch("q", [b"a", b"b"])
        consumer = broker.consumer("q", "g")
        first = consumer.receive(timeout=RECEIVE_S)
        assert first is not None
        assert (first.offset, first.attempt) == (0, 1)
        broker.engine.flush().wait(RECEIVE_S)  # the delivery is on disk
        broker.engine.abandon()  # ... and the consumer dies holding it
    with connected(data_dir) as broker:
        got = drain(broker.consumer("q", "g"))
        assert [(m.offset, m.body, m.attempt) for m in got] == [(0, b"a", 2), (1, b"b", 1)]


def corrupt_batch(path: Path, queue: str, first: int) -> None:
    with contextlib.closing(sqlite3.connect(path / DB_NAME)) as db:
        (data,) = db.execute(
            "SELECT data FROM batches WHERE queue=? AND first=?", (queue, first)
        ).fetchone()
        flipped = bytes(data[:-1]) + bytes([data[-1] ^ 0x01])
        cur = db.execute(
            "UPDATE batches SET data=? WHERE queue=? AND first=?", (flipped, queue, first)
        )
        assert cur.rowcount == 1
        db.commit()


def test_a_corrupted_batch_makes_receive_raise_never_skip(data_dir: Path) -> None:
    with connected(data_dir) as broker:
        broker.create_queue("q", "at-least-once")
        producer = broker.producer()
        assert [producer.send("q", b"m%d" % i) for i in range(3)] == [0, 1, 2]  # 3 batches
    corrupt_batch(data_dir, "q", 1)
    with connected(data_dir) as broker:
        consumer = broker.consumer("q", "g")
        msg = consumer.receive(timeout=RECEIVE_S)
        assert msg is not None
        assert (msg.offset, msg.body) == (0, b"m0")
        msg.ack()
        for _ in range(2):  # every try fails loudly; offset 2 is never handed out instead
            with pytest.raises(CorruptData, match=r"offset 1 of queue 'q'"):
                consumer.receive(timeout=RECEIVE_S)


def test_a_corrupted_batch_on_memory_makes_receive_raise() -> None:
    store = MemoryStorage()
    broker = arrival.connect(store)
    try:
        broker.create_queue("q", "at-least-once")
        broker.producer().send("q", b"m0")
        broker.producer().send("q", b"m1")
        broker.close()
        store.corrupt("q", 0)
        broker = arrival.connect(store)  # a new engine: nothing cached
        with pytest.raises(CorruptData, match="checksum"):
            broker.consumer("q", "g").receive(timeout=RECEIVE_S)
    finally:
        broker.close()


def test_a_corrupted_newest_batch_refuses_to_open() -> None:
    """The newest batch fixes where the log ends: it is checked when the broker opens."""
    store = MemoryStorage()
    broker = arrival.connect(store)
    broker.create_queue("q", "at-least-once")
    broker.producer().send("q", b"m0")
    broker.close()
    store.corrupt("q", 0)
    with pytest.raises(CorruptData, match="checksum"):
        arrival.connect(store)


def test_a_corrupted_group_record_refuses_to_open_and_frees_the_directory(
    data_dir: Path,
) -> None:
    with connected(data_dir) as broker:
        broker.create_queue("q", "at-least-once")
        broker.producer().send("q", b"m")
        msg = broker.consumer("q", "g").receive(timeout=RECEIVE_S)
        assert msg is not None
        msg.ack()
    with contextlib.closing(sqlite3.connect(data_dir / DB_NAME)) as db:
        rows = db.execute("SELECT id, data FROM groups WHERE queue='q' AND grp='g'").fetchall()
        assert rows
        row_id, data = rows[-1]
        flipped = bytes([data[0] ^ 0x01]) + bytes(data[1:])
        db.execute("UPDATE groups SET data=? WHERE id=?", (flipped, row_id))
        db.commit()
    for _attempt in range(2):
        with pytest.raises(CorruptData, match="group 'g' on queue 'q' fails its checksum") as exc:
            arrival.connect(str(data_dir))
        assert not isinstance(exc.value, DataDirectoryInUse)
