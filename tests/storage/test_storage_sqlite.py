"""SqliteStorage's own promises: one owner per directory, its files, its fsync policy.

Ownership is tested across real processes: a child opens the store and is killed with
SIGKILL; the kernel releases its ``flock`` and the directory opens again, with what the
child committed intact.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import arrival
from arrival.errors import DataDirectoryInUse, StorageError
from arrival.storage.base import GroupRecord, Loaded, WriteSet
from arrival.storage.sqlite import DB_NAME, LOCK_NAME, SqliteStorage

CHILD_READY_TIMEOUT_S = 20.0  # a cold interpreter importing arrival on a loaded CI box

CHILD = textwrap.dedent(
    """
    import sys, time
    from arrival.storage.base import WriteSet
    from arrival.storage.sqlite import SqliteStorage

    store = SqliteStorage(sys.argv[1])
    store.load()
    store.commit(WriteSet(specs={"child": b"spec"}, batches=[("child", 0, 1, b"synced")]))
    store.commit(WriteSet(batches=[("child", 1, 1, b"unsynced")], sync=False))
    print("ready", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@contextlib.contextmanager
def opened(path: Path) -> Iterator[tuple[SqliteStorage, Loaded]]:
    store = SqliteStorage(path)
    try:
        loaded = store.load()
        yield store, loaded
    finally:
        store.close()


@contextlib.contextmanager
def child_owner(path: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process that owns ``path`` until it is killed (always reaped)."""
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], CHILD_READY_TIMEOUT_S)
            line = proc.stdout.readline() if ready else ""
            if line.strip() != "ready":
                proc.kill()
                _, err = proc.communicate()
                pytest.fail(f"the child did not open the store: {line!r} {err}")
            yield proc
        finally:
            proc.kill()
            proc.wait()


# -- ownership ----------------------------------------------------------------------------


def test_second_store_in_the_same_process_is_refused(data_dir: Path) -> None:
    with opened(data_dir) as (first, _):
        first.commit(WriteSet(specs={"q": b"s"}))
        second = SqliteStorage(data_dir)
        with pytest.raises(DataDirectoryInUse) as exc:
            second.load()
        assert exc.value.owner_pid == os.getpid()
        assert exc.value.path == str(data_dir)
        assert f"process {os.getpid()}" in str(exc.value)
        assert str(data_dir) in str(exc.value)
        with pytest.raises(StorageError, match="closed"):  # the refused store stays closed
            second.read("q", 0)
    # the owner closed: the refused instance can now open and sees the data
    try:
        assert second.load().specs == {"q": b"s"}
    finally:
        second.close()


def test_the_owner_may_reopen_after_close(data_dir: Path) -> None:
    for i in range(3):
        with opened(data_dir) as (store, loaded):
            assert loaded.meta.get("epoch") == (str(i - 1).encode() if i else None)
            store.commit(WriteSet(meta={"epoch": str(i).encode()}))
    with opened(data_dir) as (store, loaded):
        assert loaded.meta["epoch"] == b"2"
    assert (data_dir / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_another_process_owning_the_directory_is_named(data_dir: Path) -> None:
    with child_owner(data_dir) as child:
        store = SqliteStorage(data_dir)
        with pytest.raises(DataDirectoryInUse) as exc:
            store.load()
        assert exc.value.owner_pid == child.pid
        assert str(child.pid) in str(exc.value)
        assert "arrival serve" in str(exc.value)  # says what to do instead
        store.close()
        with pytest.raises(DataDirectoryInUse) as via_api:  # the public API says the same
            arrival.connect(str(data_dir))
        assert via_api.value.owner_pid == child.pid


def test_directory_opens_again_after_the_owner_is_killed(data_dir: Path) -> None:
    with child_owner(data_dir) as child:
        pid = child.pid
        refused = SqliteStorage(data_dir)
        with pytest.raises(DataDirectoryInUse):  # held while the child lives
            refused.load()
        child.kill()
        assert child.wait() == -9  # SIGKILL: no cleanup ran in the child
        assert (data_dir / LOCK_NAME).read_text().strip() == str(pid)  # stale pid left
    with opened(data_dir) as (store, loaded):  # the kernel released the child's flock
        assert (data_dir / LOCK_NAME).read_text().strip() == str(os.getpid())
        # what the killed owner committed survived, synced or not (a process crash keeps
        # the page cache; only a power cut may lose unsynced commits)
        assert loaded.specs == {"child": b"spec"}
        assert loaded.batches == {"child": [(0, 1), (1, 1)]}
        assert store.read("child", 0) == b"synced"
        assert store.read("child", 1) == b"unsynced"


# -- files and directories ------------------------------------------------------------------


def test_creates_the_database_and_lock_in_the_directory(data_dir: Path) -> None:
    with opened(data_dir) as (store, _):
        store.commit(WriteSet(specs={"q": b"s"}))
        assert (data_dir / DB_NAME).is_file()
        assert (data_dir / LOCK_NAME).is_file()
        assert (data_dir / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        assert str(data_dir) in store.description["storage"]
        assert "fsync" in store.description
    header = (data_dir / DB_NAME).read_bytes()[:20]
    assert header[:16] == b"SQLite format 3\x00"
    assert header[18:20] == b"\x02\x02"  # read/write version 2: the database is in WAL mode


def test_creates_a_missing_data_directory(tmp_path: Path) -> None:
    path = tmp_path / "does" / "not" / "exist"
    with opened(path) as (store, _):
        store.commit(WriteSet(batches=[("q", 0, 1, b"x")]))
        assert store.read("q", 0) == b"x"
    assert path.is_dir()
    assert sorted(p.name for p in path.iterdir() if p.name in (DB_NAME, LOCK_NAME)) == [
        LOCK_NAME,
        DB_NAME,
    ]


def test_a_path_under_a_regular_file_raises_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("I am a file")
    path = tmp_path / "file" / "data"
    store = SqliteStorage(path)
    with pytest.raises(StorageError) as exc:
        store.load()
    store.close()
    assert type(exc.value) is StorageError
    assert "can't create data directory" in str(exc.value)
    assert str(path) in str(exc.value)
    assert (tmp_path / "file").read_text() == "I am a file"


def test_a_regular_file_as_the_data_directory_raises_storage_error(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    store = SqliteStorage(tmp_path / "data")
    with pytest.raises(StorageError, match="can't create data directory"):
        store.load()
    store.close()
    with pytest.raises(StorageError, match="can't create data directory"):
        arrival.connect(str(tmp_path / "data"))


def test_an_unopenable_lock_file_raises_storage_error(data_dir: Path) -> None:
    (data_dir / LOCK_NAME).mkdir(parents=True)
    store = SqliteStorage(data_dir)
    try:
        with pytest.raises(StorageError, match=LOCK_NAME):
            store.load()
    finally:
        store.close()


# -- commits --------------------------------------------------------------------------------


def test_sync_flag_selects_the_fsync_policy(data_dir: Path) -> None:
    # white-box: synchronous=FULL (2) fsyncs the WAL on COMMIT; NORMAL (1) does not
    def synchronous(store: SqliteStorage) -> int:
        assert store._db is not None
        return int(store._db.execute("PRAGMA synchronous").fetchone()[0])

    with opened(data_dir) as (store, _):
        store.commit(WriteSet(meta={"a": b"1"}, sync=False))
        assert (synchronous(store), store.syncs, store.commits) == (1, 0, 1)
        store.commit(WriteSet(meta={"a": b"2"}, sync=True))
        assert (synchronous(store), store.syncs, store.commits) == (2, 1, 2)
        store.commit(WriteSet(meta={"a": b"3"}, sync=False))
        assert (synchronous(store), store.syncs, store.commits) == (1, 1, 3)


def test_a_failed_commit_stores_nothing_and_the_store_stays_usable(data_dir: Path) -> None:
    with opened(data_dir) as (store, _):
        store.commit(WriteSet(specs={"q": b"s"}, batches=[("q", 0, 1, b"original")]))
        bad = WriteSet(
            meta={"epoch": b"9"},
            specs={"new": b"n"},
            batches=[("q", 1, 1, b"fine"), ("q", 0, 1, b"duplicate (queue, first)")],
            groups=[GroupRecord("q", "g", 0, True, b"g")],
        )
        with pytest.raises(StorageError, match="commit to"):
            store.commit(bad)
        assert (store.commits, store.syncs) == (1, 1)  # the failure is not counted
        assert store.read("q", 0) == b"original"
        with pytest.raises(StorageError):
            store.read("q", 1)
        store.commit(WriteSet(batches=[("q", 1, 1, b"after")]))
    with opened(data_dir) as (store, loaded):
        assert loaded.specs == {"q": b"s"}
        assert loaded.batches == {"q": [(0, 1), (1, 1)]}
        assert loaded.groups == {}
        assert "epoch" not in loaded.meta
        assert store.read("q", 1) == b"after"
