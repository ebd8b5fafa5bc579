"""The powerloss storage test mode and injected disk errors (storage/faulty.py).

In the powerloss mode a SIGKILL loses what a power cut would: writes not yet fsynced, and
files whose directory was never fsynced. The crash tests run a real child process that
commits, says DONE, and is killed with SIGKILL; the parent then reopens the directory.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import arrival
from arrival.errors import StorageError
from arrival.storage import faulty
from arrival.storage.base import Loaded, WriteSet
from arrival.storage.sqlite import DB_NAME, SqliteStorage

CHILD_TIMEOUT_S = 20.0  # a cold interpreter importing arrival on a loaded CI box

# argv: data directory, test mode ("" = off), plan (one letter per commit: s = sync=True,
# n = sync=False), and "skip-fsync-dir" to make arrival's directory fsync a no-op
CHILD = textwrap.dedent(
    """
    import sys, time
    from arrival.storage import sqlite
    from arrival.storage.base import WriteSet

    path, mode, plan, *flags = sys.argv[1:]
    if "skip-fsync-dir" in flags:
        sqlite._fsync_dir = lambda path, test=None: None
    store = sqlite.SqliteStorage(path, test_mode=mode)
    first = sum(len(v) for v in store.load().batches.values())
    for i, kind in enumerate(plan, first):
        store.commit(WriteSet(batches=[("q", i, 1, b"m%d" % i)], sync=kind == "s"))
    print("DONE", flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(autouse=True)
def _no_test_mode_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests choose their modes; a mode or canary in the environment is not theirs."""
    monkeypatch.delenv(faulty.ENV, raising=False)
    monkeypatch.delenv(faulty.CANARY_ENV, raising=False)


def killed_child(
    path: Path, mode: str, plan: str, *flags: str, env: dict[str, str] | None = None
) -> None:
    """Run CHILD, wait for DONE, SIGKILL it (always reaped)."""
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode, plan, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    ) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], CHILD_TIMEOUT_S)
            line = proc.stdout.readline() if ready else ""
            if line.strip() != "DONE":
                proc.kill()
                _, err = proc.communicate()
                pytest.fail(f"the child did not commit: {line!r} {err}")
            proc.send_signal(signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL
        finally:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def opened(path: Path, mode: str | None = "powerloss") -> Iterator[tuple[SqliteStorage, Loaded]]:
    store = SqliteStorage(path, test_mode=mode)
    try:
        yield store, store.load()
    finally:
        store.close()


def stored(path: Path, mode: str = "powerloss") -> list[int]:
    """The batch offsets stored in ``path``, opened again in ``mode``."""
    with opened(path, mode) as (_, loaded):
        return [first for first, _ in loaded.batches.get("q", [])]


# -- what SIGKILL loses ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "survivors"),
    [("powerloss", [0, 1, 2]), ("", [0, 1, 2, 3, 4])],
    ids=["powerloss", "plain-sigkill"],
)
def test_sigkill_loses_unsynced_commits_only_in_powerloss_mode(
    data_dir: Path, mode: str, survivors: list[int]
) -> None:
    killed_child(data_dir, mode, "sssnn")
    assert stored(data_dir, mode) == survivors
    # the store goes on from there; a second power cut loses the new unsynced tail again
    killed_child(data_dir, mode, "sn")
    n = len(survivors)
    assert stored(data_dir, mode) == [*survivors, n] + ([] if mode else [n + 1])


def test_a_synced_commit_makes_the_unsynced_ones_before_it_durable(data_dir: Path) -> None:
    killed_child(data_dir, "powerloss", "nnsn")
    assert stored(data_dir) == [0, 1, 2]


def test_the_canary_ack_before_fsync_loses_synced_commits(data_dir: Path) -> None:
    killed_child(data_dir, "powerloss", "s", env={faulty.CANARY_ENV: "ack-before-fsync"})
    killed_child(data_dir, "powerloss", "ss", env={faulty.CANARY_ENV: "ack-before-fsync"})
    assert stored(data_dir) == []


# -- file creations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "skip_fsync_dir", "survives"),
    [
        ("powerloss,no-sqlite-dirsync", True, False),
        ("powerloss,no-sqlite-dirsync", False, True),
        # SQLite fsyncs the directory itself, on the first sync of a new journal or WAL:
        # a store opened the first time is durable even without arrival's directory fsync
        ("powerloss", True, True),
    ],
    ids=["no-dir-fsync", "arrival-dir-fsync", "sqlite-dir-fsync"],
)
def test_a_new_database_needs_its_directory_fsynced(
    data_dir: Path, mode: str, skip_fsync_dir: bool, survives: bool
) -> None:
    killed_child(data_dir, mode, "ss", *(["skip-fsync-dir"] if skip_fsync_dir else []))
    assert (data_dir / DB_NAME).exists()  # on disk, but its directory entry may not be durable
    with opened(data_dir, mode) as (store, loaded):
        session = faulty.session(data_dir)
        assert session is not None
        if survives:
            assert session.lost == []
            assert [first for first, _ in loaded.batches["q"]] == [0, 1]
        else:  # the files went, as after a power cut; a new database took their place
            assert DB_NAME in session.lost
            assert loaded.batches == {}
            store.commit(WriteSet(batches=[("q", 0, 1, b"again")]))
    assert stored(data_dir, mode) == ([0, 1] if survives else [0])


def test_a_directory_first_opened_in_the_mode_is_taken_as_it_is(data_dir: Path) -> None:
    killed_child(data_dir, "", "sn")  # no manifest: written without the mode
    assert stored(data_dir) == [0, 1]
    assert stored(data_dir) == [0, 1]


# -- in one process ----------------------------------------------------------------------


def test_reads_see_unsynced_writes_and_a_clean_close_keeps_them(data_dir: Path) -> None:
    with opened(data_dir) as (store, _):
        store.commit(WriteSet(batches=[("q", 0, 1, b"synced")]))
        for i in range(1, 40):  # several pages of WAL, none of them fsynced
            store.commit(WriteSet(batches=[("q", i, 1, b"x%d" % i * 500)], sync=False))
        # the reader is a second connection: it sees the writer's pending writes
        assert store.read("q", 0) == b"synced"
        assert store.read("q", 39) == b"x39" * 500
        assert "powerloss" in store.description["test mode"]
    with opened(data_dir) as (store, loaded):
        assert [first for first, _ in loaded.batches["q"]] == list(range(40))
        assert store.read("q", 20) == b"x20" * 500


def test_the_mode_comes_from_the_environment(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(faulty.ENV, "powerloss,seed=7")
    with opened(data_dir, None) as (store, _):
        assert store.description["test mode"].startswith("powerloss,seed=7 ")
        assert faulty.session(data_dir) is not None
    assert faulty.session(data_dir) is None
    with opened(data_dir, "") as (store, _):  # "" turns the mode off, whatever the env says
        assert "test mode" not in store.description


# -- disk errors ---------------------------------------------------------------------------


def arm(path: Path, **faults: float) -> None:
    session = faulty.session(path)
    assert session is not None
    session.set_faults(**faults)


def test_eio_on_fsync_fails_the_commit_and_loses_the_unsynced_writes(data_dir: Path) -> None:
    with opened(data_dir) as (store, _):
        store.commit(WriteSet(batches=[("q", 0, 1, b"kept")]))
        store.commit(WriteSet(batches=[("q", 1, 1, b"unsynced")], sync=False))
        arm(data_dir, eio_fsync=1.0)
        with pytest.raises(StorageError, match="EIO on fsync"):
            store.commit(WriteSet(batches=[("q", 2, 1, b"failed")]))
    # the failed commit is not there, nor (as on Linux after a failed fsync) the unsynced
    # writes the fsync was to make durable
    assert stored(data_dir) == [0]


def test_enospc_fails_the_commit(data_dir: Path) -> None:
    with opened(data_dir) as (store, _):
        store.commit(WriteSet(batches=[("q", 0, 1, b"kept")]))
        arm(data_dir, enospc=1.0)
        with pytest.raises(StorageError, match="ENOSPC"):
            store.commit(WriteSet(batches=[("q", 1, 1, b"failed")]))
        arm(data_dir, enospc=0.0)  # the disk has room again: the store goes on
        store.commit(WriteSet(batches=[("q", 2, 1, b"later")]))
    assert stored(data_dir) == [0, 2]


@pytest.mark.parametrize("fault", ["eio_fsync", "enospc"])
def test_the_engine_fails_the_send_instead_of_acknowledging_it(data_dir: Path, fault: str) -> None:
    broker = arrival.connect(SqliteStorage(data_dir, test_mode="powerloss"))
    try:
        broker.create_queue("q", "at-least-once")
        producer = broker.producer()
        assert producer.send("q", b"kept") == 0
        arm(data_dir, **{fault: 1.0})
        with pytest.raises(StorageError, match="injected"):
            producer.send("q", b"lost")
        with pytest.raises(StorageError):  # the broker refuses further work
            producer.send("q", b"after")
    finally:
        broker.close()
    with arrival.connect(SqliteStorage(data_dir, test_mode="powerloss")) as again:
        got = again.consumer("q", "g").receive_batch(10, timeout=0)
        assert [m.body for m in got] == [b"kept"]


def test_faults_follow_the_seed(tmp_path: Path) -> None:
    def failures(path: Path, seed: int) -> list[int]:
        out = []
        with opened(path, f"powerloss,seed={seed}") as (store, _):
            arm(path, enospc=0.3)
            for i in range(20):
                try:
                    store.commit(WriteSet(batches=[("q", i, 1, b"m")], sync=False))
                except StorageError:
                    out.append(i)
        return out

    first = failures(tmp_path / "a", 3)
    assert 0 < len(first) < 20  # 20 commits at 0.3 per write: some failed, not all
    assert failures(tmp_path / "b", 3) == first


# -- the option parsers ------------------------------------------------------------------


def test_options_parse_and_print_back() -> None:
    mode = faulty.parse_test_mode("powerloss, eio-fsync=0.01,enospc=0.002,seed=7")
    assert mode == faulty.TestMode(powerloss=True, eio_fsync=0.01, enospc=0.002, seed=7)
    assert faulty.parse_test_mode(str(mode)) == mode
    assert faulty.parse_test_mode("") is None
    assert faulty.parse_test_mode("eio-fsync,seed=1") == faulty.TestMode(eio_fsync=1.0, seed=1)


@pytest.mark.parametrize(
    "text",
    ["powerloss,bogus", "eio-fsync=2", "enospc=lots", "seed=x", "powerloss=1", "no-sqlite-dirsync"],
)
def test_bad_options_are_refused_naming_the_known_ones(data_dir: Path, text: str) -> None:
    with pytest.raises(ValueError, match="storage test mode") as exc:
        faulty.parse_test_mode(text)
    with pytest.raises(ValueError, match="storage test mode"):
        SqliteStorage(data_dir, test_mode=text)
    if "bogus" in text:
        assert "powerloss, eio-fsync=P, enospc=P, seed=N" in str(exc.value)


def test_a_bad_mode_in_the_environment_is_refused(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(faulty.ENV, "powerlos")
    with pytest.raises(ValueError, match="'powerlos' is unknown"):
        SqliteStorage(data_dir).load()
    assert not data_dir.exists()  # refused before touching anything


def test_canaries_parse_and_unknown_ones_are_refused() -> None:
    assert faulty.parse_canaries("ack-before-fsync, dedup-off") == {
        "ack-before-fsync",
        "dedup-off",
    }
    with pytest.raises(ValueError, match=r"unknown canary 'ack-before-sync'.*unbound-acks"):
        faulty.parse_canaries("ack-before-sync")
    proc = subprocess.run(
        [sys.executable, "-c", "import arrival.storage.faulty"],
        env={**os.environ, faulty.CANARY_ENV: "nope"},
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr
    assert "'nope'" in proc.stderr


# -- the overlay against a reference -------------------------------------------------------


class _Bytes:
    """A real file as a bytearray."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)

    def real_read(self, amount: int, offset: int) -> bytes:
        return bytes(self.data[offset : offset + amount])

    def real_write(self, data: bytes, offset: int) -> None:
        self.real_truncate(max(len(self.data), offset))
        self.data[offset : offset + len(data)] = data

    def real_truncate(self, size: int) -> None:
        del self.data[size:]
        self.data.extend(bytes(size - len(self.data)))


def test_the_overlay_reads_like_the_file_it_will_write() -> None:
    """Random writes, truncations, flushes and drops: reads and sizes always match a plain
    bytearray written the same way; a flush leaves the real file equal to it."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for _ in range(100):
        real = _Bytes(rng.randbytes(rng.randrange(20_000)))
        want = bytearray(real.data)
        overlay = faulty._Overlay(len(real.data))
        for _ in range(40):
            op = rng.random()
            if op < 0.5:
                offset, data = rng.randrange(25_000), rng.randbytes(rng.randrange(1, 9_000))
                overlay.write(real, memoryview(data), offset)
                want.extend(bytes(max(0, offset - len(want))))
                want[offset : offset + len(data)] = data
            elif op < 0.65:
                size = rng.randrange(25_000)
                overlay.truncate(size)
                del want[size:]
                want.extend(bytes(size - len(want)))
            elif op < 0.8:
                overlay.flush(real)
                assert real.data == want, f"seed {seed}"
            elif op < 0.85:
                overlay.drop()
                want = bytearray(real.data)
            offset, n = rng.randrange(26_000), rng.randrange(1, 9_000)
            assert overlay.read(real, n, offset) == want[offset : offset + n], f"seed {seed}"
            assert overlay.size == len(want), f"seed {seed}"


# -- what the test mode found in the store ----------------------------------------------


def test_a_store_whose_creation_was_cut_short_opens_as_new(data_dir: Path) -> None:
    """A crash right after SQLite created the file, before any table: an empty database
    is a new store, not a damaged one (its tables and format row commit together)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / DB_NAME).write_bytes(b"")
    with opened(data_dir, "") as (store, loaded):
        assert loaded.batches == {}
        store.commit(WriteSet(batches=[("q", 0, 1, b"x")]))
    assert stored(data_dir, "") == [0]


def test_a_store_with_tables_but_no_format_is_refused_as_damaged(data_dir: Path) -> None:
    with opened(data_dir, ""):
        pass
    import sqlite3

    db = sqlite3.connect(data_dir / DB_NAME)
    db.execute("DELETE FROM meta")
    db.commit()
    db.close()
    with pytest.raises(StorageError, match="format"), opened(data_dir, ""):
        pass


def test_a_disk_error_while_opening_is_not_reported_as_damage(data_dir: Path) -> None:
    """EIO or ENOSPC at open: the data is not known to be damaged, so the error says
    the disk failed rather than 'restore from a backup'."""
    from arrival.errors import CorruptData

    for mode in ("powerloss,eio-fsync=1.0", "powerloss,enospc=1.0"):
        with pytest.raises(StorageError) as info, opened(data_dir, mode):
            pass
        assert not isinstance(info.value, CorruptData), info.value
        assert "disk" in str(info.value)


def test_a_failed_commit_reports_its_own_cause(data_dir: Path) -> None:
    """After an I/O error SQLite has rolled the transaction back already; the error
    raised is the I/O error, not the failing ROLLBACK's 'no transaction is active'."""
    with opened(data_dir) as (store, _):
        store.commit(WriteSet(batches=[("q", 0, 1, b"kept")]))
        arm(data_dir, enospc=1.0)
        for n in (1, 2):
            with pytest.raises(StorageError) as info:
                store.commit(WriteSet(batches=[("q", n, 1, b"x" * 100_000)]))
            assert "no transaction" not in str(info.value)
            assert "ENOSPC" in str(info.value) or "full" in str(info.value)
