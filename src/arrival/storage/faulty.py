"""Storage test modes: a power cut that SIGKILL can deliver, and disk errors on demand.

SIGKILL alone cannot find a missing fsync: the page cache outlives the process. In the
*powerloss* test mode SQLite reaches its files through a VFS of ours (``arrival-powerloss``,
built on the default unix VFS with apsw) that keeps every write, truncation and file
creation in this process's memory until the fsync that would make it durable. A SIGKILL
then loses exactly what a power cut would.

Selected by ``SqliteStorage(path, test_mode=...)`` or, when that is None, the environment
variable ``ARRIVAL_STORAGE_TEST``: comma-separated options, probabilities per call::

    powerloss                 un-fsynced writes and file creations die with the process
    eio-fsync=P               an fsync fails with EIO (SQLITE_IOERR_FSYNC) and, as Linux
                              does after a failed fsync, the file's pending writes are lost
    enospc=P                  a write fails with ENOSPC (SQLITE_FULL)
    seed=N                    the seed of the fault coin (default: random, see description)
    no-sqlite-dirsync         (with powerloss) don't count SQLite's own directory fsyncs:
                              only arrival's makes a created file durable, as with a SQLite
                              built with SQLITE_DISABLE_DIRSYNC

Without a test mode SqliteStorage uses the stdlib ``sqlite3`` as ever: this module's top
imports nothing but the stdlib, and apsw is imported only when a test-mode store connects.
In a test mode both of the store's connections (writer and reader) go through apsw and
the VFS; ``Connection`` makes them look like ``sqlite3`` connections, errors included.

What the powerloss mode models, as numbered invariants:

1. A write or truncation of the database, its WAL or a rollback journal reaches the real
   file only when that file is fsynced (``xSync``), all of it, in order, then really
   fsynced. Reads and sizes see the pending writes, from every connection of the process
   (memory-mapped reads are turned off: they would not). WAL mode works unchanged: apsw
   passes the shared-memory methods to the unix VFS.
2. A clean close of the last handle of a file writes its pending writes to the real file
   without fsync: a clean close is not a power cut (and SQLite leaves nothing pending then).
3. A file's creation is durable once its directory is fsynced: SQLite's own directory
   fsync (the unix VFS does one on the first sync of a new WAL or journal) or arrival's
   ``fsync_dir``. ``POWERLOSS-MANIFEST`` (written for real: temp file, fsync, rename,
   directory fsync) lists the files present at the last directory fsync. Opening a data
   directory in this mode first deletes every file not listed: its directory entry never
   became durable, so a power cut would have lost it.
4. Not modelled: a power cut persisting only part of the pending writes (torn or
   reordered writes: here they are all lost), deletions and renames being undone (a
   deleted file stays deleted), the data directory's own creation in its parent, the
   ``-shm`` file (SQLite rebuilds it on the first open after a crash), and errors on
   directory fsyncs (injected errors hit SQLite's ``xSync`` and ``xWrite`` only). A data
   directory must be opened in this mode always or never: a
   file created by a run without it is deleted by the next run with it unless listed
   (delete ``POWERLOSS-MANIFEST`` to take a directory as it is).

Canaries (``ARRIVAL_CANARY``, see ``arrival._canary``) break a rule on purpose so that
``arrival verify`` can show it catches the breakage; the storage's is ``ack-before-fsync``.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from arrival._canary import CANARIES as KNOWN_CANARIES
from arrival._canary import ON as CANARIES
from arrival._canary import parse as parse_canaries

if TYPE_CHECKING:
    import apsw

__all__ = [
    "CANARIES",
    "CANARY_ENV",
    "ENV",
    "KNOWN_CANARIES",
    "MANIFEST",
    "OPTIONS",
    "VFS_NAME",
    "Connection",
    "Database",
    "Rows",
    "Session",
    "TestMode",
    "parse_canaries",
    "parse_test_mode",
    "session",
]

ENV = "ARRIVAL_STORAGE_TEST"
CANARY_ENV = "ARRIVAL_CANARY"
VFS_NAME = "arrival-powerloss"
MANIFEST = "POWERLOSS-MANIFEST"
_MANIFEST_TMP = MANIFEST + ".tmp"
OPTIONS = ("powerloss", "eio-fsync=P", "enospc=P", "seed=N", "no-sqlite-dirsync")
_BLOCK = 4096  # the overlay's unit; any size works, a page is the common write
_MAX_WRITE = 16 * _BLOCK  # the unix VFS writes at most 128 KiB per call (seekAndWriteFd)


# =====================================================================================
# the test mode
# =====================================================================================


@dataclass(frozen=True, slots=True)
class TestMode:
    """A parsed ``ARRIVAL_STORAGE_TEST``; ``str()`` gives it back, seed included."""

    __test__ = False  # not a pytest test class

    powerloss: bool = False
    eio_fsync: float = 0.0  # probability per fsync
    enospc: float = 0.0  # probability per write
    seed: int = 0
    sqlite_dirsync: bool = True  # count SQLite's own directory fsyncs (see invariant 3)

    def __str__(self) -> str:
        parts = ["powerloss"] if self.powerloss else []
        if not self.sqlite_dirsync:
            parts.append("no-sqlite-dirsync")
        if self.eio_fsync:
            parts.append(f"eio-fsync={self.eio_fsync:g}")
        if self.enospc:
            parts.append(f"enospc={self.enospc:g}")
        parts.append(f"seed={self.seed}")
        return ",".join(parts)


def parse_test_mode(text: str) -> TestMode | None:
    """``text`` as a TestMode, or None when it is empty; ValueError naming the options
    when it holds an unknown or malformed one."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        return None
    known = ", ".join(OPTIONS)
    what = f"storage test mode {text!r} ({ENV} or SqliteStorage(test_mode=...))"
    values: dict[str, Any] = {}
    for part in parts:
        name, eq, value = part.partition("=")
        name = name.strip()
        try:
            if name in ("powerloss", "no-sqlite-dirsync"):
                if eq:
                    raise ValueError("takes no value")
                values["powerloss" if name == "powerloss" else "sqlite_dirsync"] = (
                    name == "powerloss"
                )
            elif name in ("eio-fsync", "enospc"):
                p = float(value) if eq else 1.0
                if not 0.0 <= p <= 1.0:
                    raise ValueError("is a probability, from 0 to 1")
                values[name.replace("-", "_")] = p
            elif name == "seed":
                values["seed"] = int(value)
            else:
                raise ValueError(f"is unknown; known: {known}")
        except ValueError as exc:
            raise ValueError(f"{what}: option {part!r} {exc}") from None
    if "sqlite_dirsync" in values and not values.get("powerloss"):
        raise ValueError(f"{what}: no-sqlite-dirsync needs powerloss")
    values.setdefault("seed", random.randrange(2**32))
    return TestMode(**values)


# =====================================================================================
# what sqlite.py needs from a connection: the stdlib's, or apsw's through the adapter
# =====================================================================================


class Rows(Protocol):
    def __iter__(self) -> Iterator[Any]: ...

    def fetchone(self) -> Any: ...


class Database(Protocol):
    """The part of ``sqlite3.Connection`` that SqliteStorage uses."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Rows: ...

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> object: ...

    def executescript(self, sql_script: str, /) -> object: ...

    def close(self) -> None: ...


class _Rows:
    """A statement's rows, all fetched: an apsw cursor left unfinished keeps its
    statement (and its read transaction) open."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self._rows = iter(rows)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return self._rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return next(self._rows, None)


def _translate(exc: apsw.Error) -> Exception:
    """The stdlib sqlite3 exception for an apsw one, same message, so that sqlite.py's
    ``except sqlite3.Error`` paths classify it as they would the stdlib's."""
    import sqlite3

    import apsw

    if isinstance(exc, apsw.CorruptError | apsw.NotADBError):
        return sqlite3.DatabaseError(str(exc))
    if isinstance(exc, apsw.ConstraintError):
        return sqlite3.IntegrityError(str(exc))
    return sqlite3.OperationalError(str(exc))


class Connection:
    """An apsw connection behind the ``Database`` interface, apsw errors as sqlite3's."""

    def __init__(self, conn: apsw.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> _Rows:
        import apsw

        try:
            return _Rows(list(self._conn.execute(sql, tuple(parameters))))
        except apsw.Error as exc:
            raise _translate(exc) from exc

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> None:
        import apsw

        try:
            for _ in self._conn.executemany(sql, [tuple(p) for p in seq_of_parameters]):
                pass
        except apsw.Error as exc:
            raise _translate(exc) from exc

    def executescript(self, sql_script: str, /) -> None:
        import apsw

        try:
            for _ in self._conn.execute(sql_script):
                pass
        except apsw.Error as exc:
            raise _translate(exc) from exc

    def close(self) -> None:
        import apsw

        try:
            self._conn.close()
        except apsw.Error as exc:
            raise _translate(exc) from exc


# =====================================================================================
# the overlay: one file's pending writes
# =====================================================================================


class _RealFile(Protocol):
    """The real file under an overlay: the base VFS's methods."""

    def real_read(self, amount: int, offset: int) -> bytes: ...

    def real_write(self, data: bytes, offset: int) -> None: ...

    def real_truncate(self, size: int) -> None: ...


@dataclass(eq=False)
class _Overlay:
    """What one file holds that its real file does not have yet (invariant 1), shared by
    every handle of the file in this process.

    ``blocks`` are whole ``_BLOCK``-sized images of the logical file, for the blocks
    written since the last sync; ``size`` is the logical size; real bytes at or past
    ``floor`` are logically gone (a pending truncation); ``real_size`` is the real file's.
    """

    real_size: int
    size: int = 0
    floor: int = 0
    blocks: dict[int, bytearray] = field(default_factory=dict)
    handles: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.size = self.floor = self.real_size

    @property
    def pending(self) -> bool:
        return bool(self.blocks) or self.size != self.real_size or self.floor != self.real_size

    def _base(self, f: _RealFile, b: int) -> bytearray:
        """Block ``b`` as the real file has it, zeros past ``floor``."""
        start = b * _BLOCK
        n = min(_BLOCK, self.floor - start)
        data = bytearray(f.real_read(n, start)) if n > 0 else bytearray()
        data.extend(bytes(_BLOCK - len(data)))
        return data

    def read(self, f: _RealFile, amount: int, offset: int) -> bytes:
        end = min(offset + amount, self.size)
        if end <= offset:
            return b""
        first, last = offset // _BLOCK, (end - 1) // _BLOCK
        if end <= self.floor and not any(b in self.blocks for b in range(first, last + 1)):
            return f.real_read(end - offset, offset)
        out = bytearray()
        for b in range(first, last + 1):
            block = self.blocks.get(b)
            if block is None:
                block = self._base(f, b)
            start = b * _BLOCK
            out += block[max(offset, start) - start : min(end, start + _BLOCK) - start]
        return bytes(out)

    def write(self, f: _RealFile, data: memoryview, offset: int) -> None:
        end = offset + len(data)
        for b in range(offset // _BLOCK, (end - 1) // _BLOCK + 1):
            start = b * _BLOCK
            lo, hi = max(offset, start), min(end, start + _BLOCK)
            block = self.blocks.get(b)
            if block is None:
                whole = lo == start and hi == start + _BLOCK
                block = self.blocks[b] = bytearray(_BLOCK) if whole else self._base(f, b)
            block[lo - start : hi - start] = data[lo - offset : hi - offset]
        self.size = max(self.size, end)

    def truncate(self, size: int) -> None:
        if size < self.size:
            for b in [b for b in self.blocks if b * _BLOCK >= size]:
                del self.blocks[b]
            block = self.blocks.get(size // _BLOCK)
            if block is not None:
                cut = size % _BLOCK
                block[cut:] = bytes(_BLOCK - cut)
            self.floor = min(self.floor, size)
        self.size = size

    def flush(self, f: _RealFile) -> None:
        """Apply everything pending to the real file (no fsync: the caller's job)."""
        if not self.pending:
            return
        if self.floor < self.real_size:
            f.real_truncate(self.floor)
        end = self.floor
        run_start, run = -1, bytearray()
        for b in sorted(self.blocks):
            start = b * _BLOCK
            if start >= self.size:
                break
            if run and (start != run_start + len(run) or len(run) >= _MAX_WRITE):
                f.real_write(bytes(run), run_start)
                run = bytearray()
            if not run:
                run_start = start
            run += self.blocks[b][: min(_BLOCK, self.size - start)]
        if run:
            f.real_write(bytes(run), run_start)
            end = max(end, run_start + len(run))
        if end != self.size:
            f.real_truncate(self.size)
        self.blocks.clear()
        self.real_size = self.floor = self.size

    def drop(self) -> None:
        """Forget everything pending, as Linux does with a file's dirty pages after a
        failed fsync."""
        self.blocks.clear()
        self.size = self.floor = self.real_size


# =====================================================================================
# sessions: a data directory open in a test mode
# =====================================================================================

_sessions: dict[str, Session] = {}  # by the data directory's real path
_sessions_lock = threading.Lock()


def session(directory: str | os.PathLike[str]) -> Session | None:
    """The open test-mode session of ``directory``, if any: tests use it to change the
    fault probabilities of a store that is already open (``set_faults``)."""
    with _sessions_lock:
        return _sessions.get(os.path.realpath(directory))


class Session:
    """One data directory open in a test mode: its overlays, its manifest, its fault coin.

    Opening a session in powerloss mode first applies invariant 3: files whose creation
    never became durable are deleted. ``keep`` names files that are not the database's
    (the lock file) and are left alone.
    """

    def __init__(
        self, directory: str | os.PathLike[str], mode: TestMode, keep: Iterable[str] = ()
    ) -> None:
        self.directory = Path(directory)
        self.mode = mode
        self.lost: list[str] = []  # files deleted on open: their creation was never durable
        self._key = os.path.realpath(self.directory)
        self._keep = frozenset(keep) | {MANIFEST, _MANIFEST_TMP}
        self._rng = random.Random(mode.seed)
        self._lock = threading.Lock()
        self._overlays: dict[str, _Overlay] = {}
        self._manifest: frozenset[str] = frozenset()
        if mode.powerloss:
            self._prepare()
        with _sessions_lock:
            if self._key in _sessions:
                raise ValueError(f"{str(self.directory)!r} is already open in a storage test mode")
            _sessions[self._key] = self

    def __repr__(self) -> str:
        return f"<faulty.Session {str(self.directory)!r} {self.mode}>"

    def close(self) -> None:
        """End the session (after the connections are closed)."""
        with _sessions_lock:
            if _sessions.get(self._key) is self:
                del _sessions[self._key]

    def set_faults(self, *, eio_fsync: float | None = None, enospc: float | None = None) -> None:
        """Change fault probabilities from now on (tests: arm a fault once a store is open)."""
        self.mode = replace(
            self.mode,
            eio_fsync=self.mode.eio_fsync if eio_fsync is None else eio_fsync,
            enospc=self.mode.enospc if enospc is None else enospc,
        )

    def connect(self, path: str | os.PathLike[str], *, timeout_s: float) -> Connection:
        """A connection to the database at ``path`` (in this directory) through the VFS."""
        import apsw

        _register_vfs()
        conn = apsw.Connection(
            str(path), flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE, vfs=VFS_NAME
        )
        db = Connection(conn)
        try:
            conn.set_busy_timeout(int(timeout_s * 1000))
            db.execute("PRAGMA mmap_size=0")  # reads of a mapped file would skip the overlay
        except BaseException:
            db.close()
            raise
        return db

    def fsync_dir(self) -> None:
        """fsync the directory: what exists now is durable (the manifest says so)."""
        names = self._listing()
        _fsync_path(self.directory)
        if self.mode.powerloss:
            self._record(names)

    # -- faults ------------------------------------------------------------------------

    def _coin(self, p: float) -> bool:
        if p <= 0.0:
            return False
        with self._lock:
            return self._rng.random() < p

    # -- the manifest ------------------------------------------------------------------

    def _listing(self) -> frozenset[str]:
        with os.scandir(self.directory) as it:
            return frozenset(e.name for e in it if e.is_file() and e.name not in self._keep)

    def _prepare(self) -> None:
        manifest = self.directory / MANIFEST
        with contextlib.suppress(FileNotFoundError):
            (self.directory / _MANIFEST_TMP).unlink()
        try:
            text = manifest.read_text()
        except FileNotFoundError:
            # first use in this mode: what is here came from elsewhere and is taken as is
            self._record(self._listing())
            return
        self._manifest = frozenset(line for line in text.splitlines() if line and line[0] != "#")
        self.lost = sorted(self._listing() - self._manifest)
        for name in self.lost:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()
        if self.lost:
            _fsync_path(self.directory)

    def _record(self, names: frozenset[str]) -> None:
        """Write the manifest for real: temp file, fsync, rename, directory fsync."""
        with self._lock:
            if names == self._manifest and (self.directory / MANIFEST).exists():
                return
            self._manifest = names
            tmp = self.directory / _MANIFEST_TMP
            text = "# files whose creation is durable (arrival storage test mode)\n"
            text += "".join(f"{n}\n" for n in sorted(names))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.directory / MANIFEST)
            _fsync_path(self.directory)

    # -- overlays ----------------------------------------------------------------------

    def _attach(self, path: str, real_size: int) -> _Overlay:
        with self._lock:
            overlay = self._overlays.get(path)
            if overlay is None:
                overlay = self._overlays[path] = _Overlay(real_size)
            overlay.handles += 1
            return overlay

    def _detach(self, path: str, overlay: _Overlay, f: _RealFile) -> None:
        with self._lock:
            overlay.handles -= 1
            last = overlay.handles == 0
            if last and self._overlays.get(path) is overlay:
                del self._overlays[path]
        if last:
            with overlay.lock:
                overlay.flush(f)  # invariant 2

    def _forget(self, path: str) -> None:
        """``path`` was deleted: a file created again under its name starts afresh."""
        with self._lock:
            self._overlays.pop(path, None)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _session_of(filename: str) -> Session | None:
    with _sessions_lock:
        return _sessions.get(os.path.realpath(os.path.dirname(filename)))


# =====================================================================================
# the VFS (apsw is imported here, on first use)
# =====================================================================================

_vfs: object | None = None
_vfs_lock = threading.Lock()


def _register_vfs() -> None:
    global _vfs
    with _vfs_lock:
        if _vfs is None:
            _vfs = _make_vfs()


def _make_vfs() -> object:
    import apsw

    tracked = (
        apsw.SQLITE_OPEN_MAIN_DB
        | apsw.SQLITE_OPEN_MAIN_JOURNAL
        | apsw.SQLITE_OPEN_WAL
        | apsw.SQLITE_OPEN_SUPER_JOURNAL
    )
    # the unix VFS fsyncs the directory on the first sync of a file it opened with these
    dirsynced = (
        apsw.SQLITE_OPEN_MAIN_JOURNAL | apsw.SQLITE_OPEN_WAL | apsw.SQLITE_OPEN_SUPER_JOURNAL
    )

    class File(apsw.VFSFile):
        def __init__(self, name: str | apsw.URIFilename | None, flags: list[int]) -> None:
            super().__init__("", name, flags)
            self._closed = False
            path = name.filename() if isinstance(name, apsw.URIFilename) else name
            self._path = path or ""
            self._session = _session_of(path) if path and flags[0] & tracked else None
            self._dirsync = bool(flags[0] & apsw.SQLITE_OPEN_CREATE and flags[0] & dirsynced)
            self._overlay: _Overlay | None = None
            if self._session is not None and self._session.mode.powerloss:
                self._overlay = self._session._attach(self._path, super().xFileSize())

        # the real file, for the overlay
        def real_read(self, amount: int, offset: int) -> bytes:
            return super().xRead(amount, offset)

        def real_write(self, data: bytes, offset: int) -> None:
            super().xWrite(data, offset)

        def real_truncate(self, size: int) -> None:
            super().xTruncate(size)

        # the VFS methods
        def xRead(self, amount: int, offset: int) -> bytes:
            overlay = self._overlay
            if overlay is None:
                return super().xRead(amount, offset)
            with overlay.lock:
                return overlay.read(self, amount, offset)

        def xWrite(self, data: bytes, offset: int) -> None:  # any buffer, in fact
            s = self._session
            if s is not None and s._coin(s.mode.enospc):
                raise apsw.FullError("injected ENOSPC (storage test mode)")
            overlay = self._overlay
            if overlay is None:
                super().xWrite(data, offset)
                return
            with overlay.lock:
                overlay.write(self, memoryview(data).cast("B"), offset)

        def xTruncate(self, newsize: int) -> None:
            overlay = self._overlay
            if overlay is None:
                super().xTruncate(newsize)
                return
            with overlay.lock:
                overlay.truncate(newsize)

        def xFileSize(self) -> int:
            overlay = self._overlay
            if overlay is None:
                return super().xFileSize()
            with overlay.lock:
                return overlay.size

        def xSync(self, flags: int) -> None:
            s = self._session
            overlay = self._overlay
            if s is not None and s._coin(s.mode.eio_fsync):
                if overlay is not None:
                    with overlay.lock:
                        overlay.drop()
                exc = apsw.IOError("injected EIO on fsync (storage test mode)")
                exc.extendedresult = apsw.SQLITE_IOERR_FSYNC  # type: ignore[attr-defined]
                raise exc
            names = None  # what the directory holds, if this sync fsyncs it too
            if s is not None and overlay is not None and self._dirsync and s.mode.sqlite_dirsync:
                names = s._listing()
            if overlay is not None:
                with overlay.lock:
                    overlay.flush(self)
            super().xSync(flags)  # fsyncs the directory too, the first time (self._dirsync)
            self._dirsync = False
            if names is not None and s is not None:
                s._record(names)  # invariant 3

        def xClose(self) -> None:
            try:
                if not self._closed and self._overlay is not None and self._session is not None:
                    self._session._detach(self._path, self._overlay, self)
            finally:
                self._closed = True
                super().xClose()

    class Vfs(apsw.VFS):
        def __init__(self) -> None:
            super().__init__(VFS_NAME, base="")

        def xOpen(self, name: str | apsw.URIFilename | None, flags: list[int]) -> apsw.VFSFile:
            return File(name, flags)

        def xDelete(self, filename: str, syncdir: bool) -> None:
            s = _session_of(filename)
            names = None  # what the directory holds after the deletion, if it is fsynced
            if s is not None and syncdir and s.mode.powerloss and s.mode.sqlite_dirsync:
                names = s._listing() - {os.path.basename(filename)}
            super().xDelete(filename, syncdir)
            if s is not None:
                s._forget(filename)
                if names is not None:
                    s._record(names)

    return Vfs()
