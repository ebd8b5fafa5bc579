"""A damaged disk is reported, never believed: SqliteStorage checksums and bad files.

Each test damages ``arrival.db`` with the ``sqlite3`` module while the store is closed
(a bit flip in a stored blob, written without updating its CRC, as a failing disk would),
then checks that ``load()`` or ``read()`` raises ``CorruptData`` naming what is damaged,
and that a failed open leaves the data directory free for the next attempt.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from arrival.errors import CorruptData, DataDirectoryInUse, StorageError
from arrival.storage.base import GroupRecord, WriteSet
from arrival.storage.sqlite import DB_NAME, SqliteStorage


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@contextlib.contextmanager
def opened(path: Path) -> Iterator[SqliteStorage]:
    store = SqliteStorage(path)
    try:
        store.load()
        yield store
    finally:
        store.close()


def populate(path: Path) -> None:
    with opened(path) as store:
        store.commit(
            WriteSet(
                meta={"epoch": b"1", "low:q": b"0"},
                specs={"q": b"spec of q", "r": b"spec of r"},
                batches=[("q", 0, 2, b"first batch"), ("q", 2, 1, b"second batch")],
                groups=[
                    GroupRecord("q", "billing", 0, True, b"snapshot"),
                    GroupRecord("q", "billing", 1, False, b"delta"),
                ],
            )
        )


def load_then_read(store: SqliteStorage, queue: str, first: int) -> bytes:
    """Open the store and read one batch: damage may surface in either step."""
    store.load()
    return store.read(queue, first)


def flip(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def tamper(path: Path, sql: str, params: tuple[object, ...] = ()) -> None:
    """Change the closed store's database behind its back (CRC columns untouched)."""
    with contextlib.closing(sqlite3.connect(path / DB_NAME)) as db:
        cur = db.execute(sql, params)
        assert cur.rowcount == 1, sql
        db.commit()


def blob(path: Path, sql: str, params: tuple[object, ...] = ()) -> bytes:
    with contextlib.closing(sqlite3.connect(path / DB_NAME)) as db:
        row = db.execute(sql, params).fetchone()
    assert row is not None
    return bytes(row[0])


def test_flipped_batch_byte_makes_read_raise_corrupt_data(data_dir: Path) -> None:
    populate(data_dir)
    old = blob(data_dir, "SELECT data FROM batches WHERE queue='q' AND first=2")
    assert old == b"second batch"
    tamper(data_dir, "UPDATE batches SET data=? WHERE queue='q' AND first=2", (flip(old, 3),))
    with opened(data_dir) as store:
        with pytest.raises(CorruptData) as exc:
            store.read("q", 2)
        msg = str(exc.value)
        assert "offset 2" in msg
        assert "'q'" in msg
        assert "checksum" in msg
        assert str(data_dir) in msg
        assert store.read("q", 0) == b"first batch"  # undamaged batches still read
        with pytest.raises(CorruptData):
            store.read("q", 2)


def test_truncated_batch_blob_makes_read_raise_corrupt_data(data_dir: Path) -> None:
    populate(data_dir)
    tamper(data_dir, "UPDATE batches SET data=? WHERE queue='q' AND first=0", (b"first bat",))
    with opened(data_dir) as store, pytest.raises(CorruptData, match="offset 0 of queue 'q'"):
        store.read("q", 0)


def test_flipped_group_record_makes_load_raise_corrupt_data(data_dir: Path) -> None:
    populate(data_dir)
    old = blob(data_dir, "SELECT data FROM groups WHERE grp='billing' AND seq=1")
    tamper(data_dir, "UPDATE groups SET data=? WHERE grp='billing' AND seq=1", (flip(old),))
    for _attempt in range(2):  # the second attempt meets the damage, not a held LOCK
        store = SqliteStorage(data_dir)
        with pytest.raises(CorruptData) as exc:
            store.load()
        assert not isinstance(exc.value, DataDirectoryInUse)
        msg = str(exc.value)
        assert "record 1" in msg
        assert "'billing'" in msg
        assert "'q'" in msg
        assert "checksum" in msg
        store.close()


def test_flipped_queue_spec_makes_load_raise_corrupt_data(data_dir: Path) -> None:
    populate(data_dir)
    old = blob(data_dir, "SELECT spec FROM queues WHERE name='r'")
    assert old == b"spec of r"
    tamper(data_dir, "UPDATE queues SET spec=? WHERE name='r'", (flip(old, 5),))
    for _attempt in range(2):
        store = SqliteStorage(data_dir)
        with pytest.raises(CorruptData, match=r"spec of queue 'r' fails its checksum"):
            store.load()
        store.close()


def test_a_failed_load_releases_the_lock(data_dir: Path) -> None:
    populate(data_dir)
    old = blob(data_dir, "SELECT spec FROM queues WHERE name='q'")
    tamper(data_dir, "UPDATE queues SET spec=? WHERE name='q'", (flip(old),))
    store = SqliteStorage(data_dir)
    with pytest.raises(CorruptData):
        store.load()
    # repaired (e.g. from a backup): the same directory opens with no stale owner
    tamper(data_dir, "UPDATE queues SET spec=? WHERE name='q'", (old,))
    with opened(data_dir) as again:
        assert again.read("q", 0) == b"first batch"
    store.close()


@pytest.mark.parametrize(
    "garbage",
    [b"not a database at all " * 200, os.urandom(4096), b"SQLite format 3\x00" + b"\xff" * 4080],
    ids=["text", "random", "bad-header"],
)
def test_garbage_database_file_makes_load_raise_corrupt_data(
    data_dir: Path, garbage: bytes
) -> None:
    data_dir.mkdir()
    (data_dir / DB_NAME).write_bytes(garbage)
    for _attempt in range(2):  # same CorruptData again: the LOCK was released
        store = SqliteStorage(data_dir)
        with pytest.raises(CorruptData) as exc:
            store.load()
        assert not isinstance(exc.value, DataDirectoryInUse)
        assert str(data_dir / DB_NAME) in str(exc.value)
        store.close()
    assert (data_dir / DB_NAME).read_bytes() == garbage  # never "repaired" by overwriting


def open_fds_to(path: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(path)):
                out.append(target)
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_failed_open_leaves_no_file_open(data_dir: Path) -> None:
    data_dir.mkdir()
    (data_dir / DB_NAME).write_bytes(b"not a database at all " * 200)
    store = SqliteStorage(data_dir)
    with pytest.raises(CorruptData) as exc:
        store.load()
    assert exc.value is not None  # keep the exception (and its traceback) alive
    assert open_fds_to(data_dir) == []


def test_flipped_meta_value_makes_load_raise_corrupt_data(data_dir: Path) -> None:
    populate(data_dir)
    tamper(data_dir, "UPDATE meta SET value=? WHERE key='low:q'", (b"1",))  # b"0" -> b"1"
    store = SqliteStorage(data_dir)
    try:
        with pytest.raises(CorruptData):
            store.load()
    finally:
        store.close()


def test_flipped_batch_count_is_detected(data_dir: Path) -> None:
    populate(data_dir)
    tamper(data_dir, "UPDATE batches SET count=1 WHERE queue='q' AND first=0")  # was 2
    store = SqliteStorage(data_dir)
    try:
        with pytest.raises(CorruptData):
            load_then_read(store, "q", 0)
    finally:
        store.close()


def test_corrupt_data_is_a_storage_error() -> None:
    # callers that catch StorageError (the engine's writer, users) also catch damage
    assert issubclass(CorruptData, StorageError)
    assert not CorruptData.retriable


@pytest.mark.parametrize(
    ("sql", "when"),
    [
        ("UPDATE queues SET spec=CAST(spec AS TEXT) WHERE name='q'", "load"),
        ("UPDATE groups SET data=CAST(data AS TEXT) WHERE grp='billing' AND seq=1", "load"),
        ("UPDATE batches SET data=CAST(data AS TEXT) WHERE queue='q' AND first=0", "read"),
    ],
    ids=["spec", "group", "batch"],
)
def test_a_blob_stored_as_text_raises_corrupt_data(data_dir: Path, sql: str, when: str) -> None:
    populate(data_dir)  # every blob here is valid UTF-8, so SQLite returns it as str
    tamper(data_dir, sql)
    store = SqliteStorage(data_dir)
    try:
        if when == "load":
            with pytest.raises(CorruptData):
                store.load()
        else:
            store.load()
            with pytest.raises(CorruptData):
                store.read("q", 0)
    finally:
        store.close()


# -- dedup state: producers and message ids ------------------------------------------------


def populate_dedup(path: Path) -> None:
    with opened(path) as store:
        store.commit(
            WriteSet(
                specs={"q": b"spec of q"},
                batches=[("q", 0, 2, b"first batch")],
                producers={"billing": b"producer state", "audit": b"other state"},
                ids=[("q", 0, 1, 1_700_000_000.5, b"ids 0-1"), ("q", 2, 2, 1_700_000_001.0, b"2")],
            )
        )


def assert_load_fails(path: Path, *needles: str) -> None:
    """``load()`` raises CorruptData naming the damage, twice: the LOCK is released."""
    for _attempt in range(2):
        store = SqliteStorage(path)
        try:
            with pytest.raises(CorruptData) as exc:
                store.load()
            assert not isinstance(exc.value, DataDirectoryInUse)
            for needle in needles:
                assert needle in str(exc.value)
        finally:
            store.close()


def test_undamaged_dedup_state_loads(data_dir: Path) -> None:
    populate_dedup(data_dir)
    store = SqliteStorage(data_dir)
    try:
        loaded = store.load()
        assert loaded.producers == {"billing": b"producer state", "audit": b"other state"}
        assert loaded.ids == {
            "q": [(0, 1, 1_700_000_000.5, b"ids 0-1"), (2, 2, 1_700_000_001.0, b"2")]
        }
    finally:
        store.close()


def test_flipped_producer_state_makes_load_raise_corrupt_data(data_dir: Path) -> None:
    populate_dedup(data_dir)
    old = blob(data_dir, "SELECT state FROM producers WHERE id='billing'")
    tamper(data_dir, "UPDATE producers SET state=? WHERE id='billing'", (flip(old, 4),))
    assert_load_fails(data_dir, "producer 'billing'", "checksum")


def test_truncated_producer_state_makes_load_raise_corrupt_data(data_dir: Path) -> None:
    populate_dedup(data_dir)
    tamper(data_dir, "UPDATE producers SET state=? WHERE id='audit'", (b"other",))
    assert_load_fails(data_dir, "producer 'audit'")


def test_a_producer_row_moved_to_another_id_is_detected(data_dir: Path) -> None:
    populate_dedup(data_dir)
    # the state is intact, but it now claims to belong to another producer
    tamper(data_dir, "UPDATE producers SET id='intruder' WHERE id='billing'")
    assert_load_fails(data_dir, "producer 'intruder'")


def test_a_producer_state_stored_as_text_raises_corrupt_data(data_dir: Path) -> None:
    populate_dedup(data_dir)
    tamper(data_dir, "UPDATE producers SET state=CAST(state AS TEXT) WHERE id='billing'")
    assert_load_fails(data_dir, "producer 'billing'")


@pytest.mark.parametrize(
    ("sql", "needle"),
    [
        ("UPDATE idsets SET data=X'696473203120' WHERE first=0", "offset 0 of queue 'q'"),
        ("UPDATE idsets SET data=CAST(data AS TEXT) WHERE first=0", "offset 0 of queue 'q'"),
        ("UPDATE idsets SET last=7 WHERE first=0", "offset 0 of queue 'q'"),
        ("UPDATE idsets SET ts=1700000000.25 WHERE first=0", "offset 0 of queue 'q'"),
        ("UPDATE idsets SET first=9 WHERE first=2", "offset 9 of queue 'q'"),
        ("UPDATE idsets SET queue='r' WHERE first=2", "queue 'r'"),
        ("UPDATE idsets SET crc=crc+1 WHERE first=0", "offset 0 of queue 'q'"),
    ],
    ids=["data", "text", "last", "time", "first", "queue", "crc"],
)
def test_a_damaged_message_id_set_makes_load_raise_corrupt_data(
    data_dir: Path, sql: str, needle: str
) -> None:
    # a wrong offset would answer a retried send with another message's offset; a wrong
    # time would forget the ids too early: neither may be believed
    populate_dedup(data_dir)
    tamper(data_dir, sql)
    assert_load_fails(data_dir, needle)


def test_a_failed_load_of_dedup_state_releases_the_lock(data_dir: Path) -> None:
    populate_dedup(data_dir)
    tamper(data_dir, "UPDATE idsets SET last=7 WHERE first=0")
    store = SqliteStorage(data_dir)
    with pytest.raises(CorruptData):
        store.load()
    tamper(data_dir, "UPDATE idsets SET last=1 WHERE first=0")  # repaired from a backup
    with opened(data_dir) as again:
        assert again.read("q", 0) == b"first batch"
    store.close()
