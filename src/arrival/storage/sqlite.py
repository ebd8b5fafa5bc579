"""The durable store: SQLite in WAL mode, one row per record batch, checksummed.

Why SQLite: it is the most crash-tested store there is, its WAL gives atomic commits
with one fsync each (``synchronous=FULL``), and readers never block the writer.
The unit stored is a *batch* of messages, so a commit of 1,000 sends is one row and
one fsync, not 1,000.

Durability rules:
1. One process owns a data directory: an exclusive ``flock`` on ``LOCK``, which holds
   the owner's pid for the error message of the next one to try.
2. A commit with ``sync=True`` runs with ``synchronous=FULL``: SQLite fsyncs the WAL
   before ``COMMIT`` returns. ``sync=False`` commits (lease bookkeeping, at-least-once
   acks) run with ``synchronous=NORMAL``: atomic, durable by the next synced commit.
3. The directory is fsynced after the database and its WAL are first created, so a
   power cut cannot lose the files themselves.
4. Every blob carries a CRC32 checked on read; SQLite's own WAL checksums drop a torn
   tail on recovery.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import zlib
from pathlib import Path

from arrival.errors import CorruptData, DataDirectoryInUse, StorageError
from arrival.storage import faulty
from arrival.storage.base import Loaded, WriteSet

__all__ = ["SqliteStorage"]

DB_NAME = "arrival.db"
LOCK_NAME = "LOCK"
FORMAT_VERSION = b"1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, crc INTEGER NOT NULL, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY, crc INTEGER NOT NULL,
    spec BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS batches (id INTEGER PRIMARY KEY, queue TEXT NOT NULL,
    first INTEGER NOT NULL, count INTEGER NOT NULL, crc INTEGER NOT NULL, data BLOB NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS batches_by_offset ON batches (queue, first);
CREATE TABLE IF NOT EXISTS groups (id INTEGER PRIMARY KEY, queue TEXT NOT NULL,
    grp TEXT NOT NULL, seq INTEGER NOT NULL, snapshot INTEGER NOT NULL,
    crc INTEGER NOT NULL, data BLOB NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS groups_by_seq ON groups (queue, grp, seq);
CREATE TABLE IF NOT EXISTS producers (id TEXT PRIMARY KEY, crc INTEGER NOT NULL,
    state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS idsets (queue TEXT NOT NULL, first INTEGER NOT NULL,
    last INTEGER NOT NULL, ts REAL NOT NULL, crc INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (queue, first));
"""
# SQLite's messages for a failing or full disk: not damage, so not CorruptData
_IO_ERRORS = ("disk I/O error", "database or disk is full", "injected")
FORMAT_KEY = "arrival.format"  # the store's own; never shown to or written by the caller
_ACK_BEFORE_FSYNC = "ack-before-fsync" in faulty.CANARIES  # a canary: no commit is synced


def _crc(data: bytes, *header: object) -> int:
    """CRC32 over a row's identifying columns and its blob, so neither can change alone."""
    return zlib.crc32(data, zlib.crc32("\x1f".join(map(str, header)).encode()))


def _blob(value: object, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise CorruptData(
            f"{what} is stored as {type(value).__name__}, not bytes: the store is damaged"
        )
    return value


def _fsync_dir(path: Path, test: faulty.Session | None = None) -> None:
    if test is not None:
        test.fsync_dir()  # the same fsync, and the powerloss mode learns of it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SqliteStorage:
    """A data directory holding ``arrival.db`` (SQLite, WAL mode) and ``LOCK``.

    ``test_mode`` (default: the environment variable ``ARRIVAL_STORAGE_TEST``, read by
    ``load``) selects a storage test mode of ``faulty.py``, e.g. ``"powerloss"``; ``""``
    turns it off whatever the environment says.
    """

    def __init__(self, path: str | os.PathLike[str], test_mode: str | None = None) -> None:
        self.path = Path(path)
        self.syncs = 0
        self.commits = 0
        self._lock_fd: int | None = None
        self._db: faulty.Database | None = None
        self._reader: faulty.Database | None = None
        self._test_arg = test_mode
        self._test_mode = None if test_mode is None else faulty.parse_test_mode(test_mode)
        self._test: faulty.Session | None = None
        self._read_lock = threading.Lock()
        self._sync_mode: bool | None = None

    def __repr__(self) -> str:
        state = "open" if self._db is not None else "closed"
        return f"<SqliteStorage {str(self.path)!r} {state} commits={self.commits}>"

    @property
    def description(self) -> dict[str, str]:
        facts = {
            "storage": f"SQLite WAL in {str(self.path)!r}",
            "fsync": "every durable commit (synchronous=FULL), shared by concurrent sends",
        }
        if self._test_mode is not None:
            facts["test mode"] = f"{self._test_mode} (faulty.py: not for real data)"
        if _ACK_BEFORE_FSYNC:
            facts["fsync"] = "never: canary ack-before-fsync"
        return facts

    # -- open / close ----------------------------------------------------------------

    def _take_lock(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"can't create data directory {str(self.path)!r}: {exc}") from exc
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(
                f"can't open the lock file of data directory {str(self.path)!r}: {exc}; check "
                f"that the directory is writable by this user and holds no directory named LOCK"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid: int | None = int(os.pread(fd, 32, 0).decode().strip() or 0) or None
            except (ValueError, OSError):
                pid = None
            os.close(fd)
            raise DataDirectoryInUse(str(self.path), pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _connect(self) -> faulty.Database:
        db: faulty.Database
        if self._test is not None:
            db = self._test.connect(self.path / DB_NAME, timeout_s=30.0)
        else:
            db = sqlite3.connect(
                self.path / DB_NAME, isolation_level=None, check_same_thread=False, timeout=30.0
            )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except BaseException:
            db.close()
            raise
        return db

    def load(self) -> Loaded:
        if self._db is not None:
            raise StorageError(f"{self!r} is already open")
        if self._test_arg is None:
            self._test_mode = faulty.parse_test_mode(os.environ.get(faulty.ENV, ""))
        self._take_lock()
        db: faulty.Database | None = None
        try:
            if self._test_mode is not None:
                self._test = faulty.Session(self.path, self._test_mode, keep=(LOCK_NAME,))
            db = self._connect()
            # a new store is created in one transaction, tables and format row together:
            # a crash in between would leave a store that is neither new nor valid
            db.execute("BEGIN IMMEDIATE")
            try:
                fresh = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                if fresh:
                    db.execute(
                        "INSERT INTO meta VALUES (?, ?, ?)",
                        (FORMAT_KEY, _crc(FORMAT_VERSION, FORMAT_KEY), FORMAT_VERSION),
                    )
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            self._db = db
            self._reader = self._connect()
            if fresh:
                _fsync_dir(self.path, self._test)
            return self._load(db)
        except sqlite3.OperationalError as exc:
            self._abort_open(db)
            if "unable to open" in str(exc):
                raise StorageError(
                    f"can't open {str(self.path / DB_NAME)!r}: {exc}; check that this user "
                    f"may read and write the data directory"
                ) from exc
            if any(m in str(exc) for m in _IO_ERRORS):
                raise StorageError(
                    f"can't open {str(self.path / DB_NAME)!r}: {exc}; the disk failed or is "
                    f"full, the data is not known to be damaged: fix the disk and try again"
                ) from exc
            raise self._damaged(exc) from exc
        except sqlite3.DatabaseError as exc:
            self._abort_open(db)
            raise self._damaged(exc) from exc
        except BaseException:
            self._abort_open(db)
            raise

    def _damaged(self, exc: Exception) -> CorruptData:
        return CorruptData(
            f"can't open {str(self.path / DB_NAME)!r}: {exc}. The file is damaged or not "
            f"an arrival data directory; restore it from a backup or move it aside"
        )

    def _abort_open(self, db: faulty.Database | None) -> None:
        if db is not None and db is not self._db:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        self.close()

    def _load(self, db: faulty.Database) -> Loaded:
        meta: dict[str, bytes] = {}
        for key, crc, value in db.execute("SELECT key, crc, value FROM meta"):
            if _crc(_blob(value, f"meta {key!r}"), key) != crc:
                raise CorruptData(f"meta value {key!r} fails its checksum: the store is damaged")
            meta[key] = value
        version = meta.pop(FORMAT_KEY, None)
        if version != FORMAT_VERSION:
            raise StorageError(
                f"data directory {str(self.path)!r} has format {version!r}; this "
                f"arrival reads format {FORMAT_VERSION!r}"
            )
        specs: dict[str, bytes] = {}
        for name, crc, spec in db.execute("SELECT name, crc, spec FROM queues"):
            if _crc(_blob(spec, f"the spec of queue {name!r}"), name) != crc:
                raise CorruptData(f"the spec of queue {name!r} fails its checksum")
            specs[name] = spec
        batches: dict[str, list[tuple[int, int]]] = {}
        for queue, first, count in db.execute(
            "SELECT queue, first, count FROM batches ORDER BY queue, first"
        ):
            batches.setdefault(queue, []).append((first, count))
        groups: dict[tuple[str, str], list[tuple[int, bool, bytes]]] = {}
        for queue, grp, seq, snap, crc, data in db.execute(
            "SELECT queue, grp, seq, snapshot, crc, data FROM groups ORDER BY queue, grp, seq"
        ):
            what = f"record {seq} of group {grp!r} on queue {queue!r}"
            if _crc(_blob(data, what), queue, grp, seq, snap) != crc:
                raise CorruptData(f"{what} fails its checksum: the store is damaged")
            groups.setdefault((queue, grp), []).append((seq, bool(snap), data))
        producers: dict[str, bytes] = {}
        for pid, crc, state in db.execute("SELECT id, crc, state FROM producers"):
            if _crc(_blob(state, f"producer {pid!r}"), pid) != crc:
                raise CorruptData(f"the state of producer {pid!r} fails its checksum")
            producers[pid] = state
        ids: dict[str, list[tuple[int, int, float, bytes]]] = {}
        for queue, first, last, ts, crc, data in db.execute(
            "SELECT queue, first, last, ts, crc, data FROM idsets ORDER BY queue, ts, first"
        ):
            what = f"the message ids at offset {first} of queue {queue!r}"
            if _crc(_blob(data, what), queue, first, last, ts) != crc:
                raise CorruptData(f"{what} fail their checksum: the store is damaged")
            ids.setdefault(queue, []).append((first, last, ts, data))
        return Loaded(
            meta=meta, specs=specs, batches=batches, groups=groups, producers=producers, ids=ids
        )

    def close(self) -> None:
        for conn in (self._reader, self._db):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        self._db = self._reader = None
        if self._test is not None:
            self._test.close()
            self._test = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- commit / read ---------------------------------------------------------------

    def commit(self, ws: WriteSet) -> None:
        db = self._db
        if db is None:
            raise StorageError(f"{self!r} is closed")
        sync = ws.sync and not _ACK_BEFORE_FSYNC
        try:
            if self._sync_mode is not sync:
                db.execute("PRAGMA synchronous=FULL" if sync else "PRAGMA synchronous=NORMAL")
                self._sync_mode = sync
            db.execute("BEGIN IMMEDIATE")
            try:
                self._write(db, ws)
            except BaseException:
                # SQLite may have rolled back already (after an I/O error): keep the cause
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StorageError(f"commit to {str(self.path)!r} failed: {exc}") from exc
        self.commits += 1
        self.syncs += sync

    @staticmethod
    def _write(db: faulty.Database, ws: WriteSet) -> None:
        if ws.meta:
            if FORMAT_KEY in ws.meta:
                raise StorageError(f"meta key {FORMAT_KEY!r} belongs to the store")
            db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?, ?)",
                [(k, _crc(v, k), v) for k, v in ws.meta.items()],
            )
        for name, spec in ws.specs.items():
            if spec is None:
                db.execute("DELETE FROM queues WHERE name = ?", (name,))
                db.execute("DELETE FROM batches WHERE queue = ?", (name,))
                db.execute("DELETE FROM groups WHERE queue = ?", (name,))
                db.execute("DELETE FROM idsets WHERE queue = ?", (name,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO queues VALUES (?, ?, ?)", (name, _crc(spec, name), spec)
                )
        if ws.batches:
            db.executemany(
                "INSERT INTO batches (queue, first, count, crc, data) VALUES (?, ?, ?, ?, ?)",
                [(q, first, n, _crc(data, q, first, n), data) for q, first, n, data in ws.batches],
            )
        for r in ws.groups:
            if r.snapshot:
                db.execute("DELETE FROM groups WHERE queue = ? AND grp = ?", (r.queue, r.group))
            snap = int(r.snapshot)
            db.execute(
                "INSERT INTO groups (queue, grp, seq, snapshot, crc, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    r.queue,
                    r.group,
                    r.seq,
                    snap,
                    _crc(r.data, r.queue, r.group, r.seq, snap),
                    r.data,
                ),
            )
        for queue, below in ws.trims.items():
            db.execute("DELETE FROM batches WHERE queue = ? AND first + count <= ?", (queue, below))
        for pid, state in ws.producers.items():
            if state is None:
                db.execute("DELETE FROM producers WHERE id = ?", (pid,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO producers VALUES (?, ?, ?)",
                    (pid, _crc(state, pid), state),
                )
        if ws.ids:
            db.executemany(
                "INSERT OR REPLACE INTO idsets VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (q, first, last, ts, _crc(data, q, first, last, ts), data)
                    for q, first, last, ts, data in ws.ids
                ],
            )
        for queue, (before, below) in ws.id_trims.items():
            db.execute(
                "DELETE FROM idsets WHERE queue = ? AND ts <= ? AND last < ?",
                (queue, before, below),
            )

    def read(self, queue: str, first: int) -> bytes:
        reader = self._reader
        if reader is None:
            raise StorageError(f"{self!r} is closed")
        with self._read_lock:
            try:
                row = reader.execute(
                    "SELECT count, crc, data FROM batches WHERE queue = ? AND first = ?",
                    (queue, first),
                ).fetchone()
            except sqlite3.Error as exc:
                raise StorageError(f"read from {str(self.path)!r} failed: {exc}") from exc
        if row is None:
            raise StorageError(f"no batch at offset {first} of queue {queue!r}")
        count, crc, data = row
        data = _blob(data, f"batch at offset {first} of queue {queue!r}")
        where = f"batch at offset {first} of queue {queue!r} in {str(self.path)!r}"
        if _crc(data, queue, first, count) != crc:
            raise CorruptData(f"{where} fails its checksum: the disk returned damaged data")
        return data
