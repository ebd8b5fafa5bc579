"""A real, throwaway PostgreSQL server for the test session.

``PostgresServer.start()`` runs ``initdb`` into a fresh directory under the system's temp
dir and starts ``postgres`` on 127.0.0.1 and a free port (unix socket inside that
directory, trust auth, fsync off: tests need speed, not durability). ``stop()`` shuts it
down (immediate mode) and deletes the directory. Nothing else is touched: no system
cluster, no service manager.

PostgreSQL refuses to run as root; as root the server runs as the ``postgres`` user
(``setpriv``, else ``runuser``). initdb and the server get SIGKILL if the test process
dies first (``setpriv --pdeathsig``), so a killed test run leaves no server behind.

``Unavailable`` means the server binaries (or, as root, the ``postgres`` user) are
missing: the caller decides whether that skips or fails. Any other failure to start
raises ``RuntimeError`` with the server's log.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

__all__ = ["PostgresServer", "Unavailable", "find_bindir"]

USER = "postgres"  # the superuser initdb creates (-U), and the OS user when we are root
START_TIMEOUT_S = 30.0  # initdb + startup take ~1 s; a loaded CI box gets far more slack
STOP_TIMEOUT_S = 10.0
_SERVER_BINARIES = ("initdb", "postgres")


class Unavailable(Exception):
    """PostgreSQL can't be run here (no server binaries, or no ``postgres`` user as root)."""


def _has_server(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _SERVER_BINARIES)


def _version_key(path: str) -> tuple[int, ...]:
    digits = [int(p) for p in Path(path).parent.name.split(".") if p.isdigit()]
    return tuple(digits)


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``: from PATH, ``pg_config
    --bindir``, or the newest of ``/usr/lib/postgresql/*/bin`` (Debian) and
    ``/usr/pgsql-*/bin`` (RHEL). None if there is none."""
    candidates: list[Path] = []
    found = shutil.which("initdb")
    if found:  # Debian puts only wrappers in /usr/bin; follow symlinks to the real bindir
        candidates.append(Path(found).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin"):
        candidates += [Path(p) for p in sorted(glob.glob(pattern), key=_version_key, reverse=True)]
    return next((c for c in candidates if _has_server(c)), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """Our environment without PG* variables (a stray PGDATA or PGPORT must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class PostgresServer:
    """A running server; ``conninfo(db)``/``url(db)`` to connect, ``create_database()``
    for an empty database of one's own, ``stop()`` when done."""

    _names = itertools.count(1)

    def __init__(self, bindir: Path, root: Path, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.bindir = bindir
        self.root = root
        self.host = "127.0.0.1"
        self.port = port
        self.user = USER
        self._proc = proc

    def __repr__(self) -> str:
        state = "running" if self._proc.poll() is None else f"exited {self._proc.returncode}"
        return f"<PostgresServer {self.host}:{self.port} pid={self._proc.pid} {state}>"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def url(self, dbname: str = "postgres", driver: str = "psycopg") -> str:
        """A SQLAlchemy URL: ``postgresql+psycopg://postgres@127.0.0.1:PORT/dbname``."""
        return f"postgresql+{driver}://{self.user}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """A psycopg connection (``autocommit=True`` etc. pass through)."""
        kwargs.setdefault("connect_timeout", 5)
        return psycopg.connect(self.conninfo(dbname), **kwargs)

    def create_database(self, prefix: str = "t") -> str:
        """Create an empty database with a new name and return the name."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with self.connect(autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def log(self) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")
        except OSError as e:
            return f"(no server log: {e})"

    def stop(self) -> None:
        """Shut down at once (SIGQUIT: immediate mode), SIGKILL if that hangs, then delete
        the directory. Safe to call twice."""
        self._stop_process()
        shutil.rmtree(self.root, ignore_errors=True)

    def _stop_process(self) -> None:
        proc = self._proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)

    @classmethod
    def start(cls, bindir: Path | None = None) -> PostgresServer:
        """initdb and start a server; raises Unavailable, or RuntimeError with the log."""
        bindir = bindir or find_bindir()
        if bindir is None or not _has_server(bindir):
            where = (
                f"in {bindir}"
                if bindir
                else "on PATH, via pg_config or in /usr/lib/postgresql/*/bin"
            )
            raise Unavailable(
                f"PostgreSQL server binaries (initdb, postgres) not found {where}; install "
                f"the `postgresql` package to run the PostgreSQL tests"
            )
        prefix = _privileges()
        root = Path(tempfile.mkdtemp(prefix="arrival-pg-", dir=tempfile.gettempdir()))
        try:
            root.chmod(0o755)  # mkdtemp makes 0o700; the postgres user must get in
            (root / "sock").mkdir(mode=0o755)
            if os.geteuid() == 0:
                pw = pwd.getpwnam(USER)
                for p in (root, root / "sock"):
                    os.chown(p, pw.pw_uid, pw.pw_gid)
            _initdb(bindir, root, prefix)
            attempts = 3  # another process may take the free port before the server binds it
            for attempt in range(1, attempts + 1):
                port = _free_port()
                server = cls(bindir, root, port, _spawn(bindir, root, port, prefix))
                ready = False
                try:
                    ready = _wait_ready(server)
                finally:
                    if not ready:  # also on KeyboardInterrupt: leave nothing running
                        server._stop_process()
                if ready:
                    return server
                code = server._proc.returncode
                if code is None or attempt == attempts:
                    what = (
                        f"did not accept connections within {START_TIMEOUT_S:.0f} s"
                        if code is None
                        else f"exited with code {code} while starting ({attempt} attempts)"
                    )
                    raise RuntimeError(f"PostgreSQL {what}; server log:\n{server.log()}")
            raise AssertionError("unreachable")
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise


def _privileges() -> list[str]:
    """The command prefix for initdb and postgres, ending just before the program: as root,
    run as the postgres user; with setpriv, SIGKILL the child if this process dies."""
    setpriv = shutil.which("setpriv")  # execs in place: the PID we hold is the server's
    guard = [setpriv, "--pdeathsig=KILL"] if setpriv else []
    if os.geteuid() != 0:
        return [*guard, "--"] if guard else []
    try:
        pwd.getpwnam(USER)
    except KeyError:
        raise Unavailable(
            f"running as root, and PostgreSQL refuses root, but there is no {USER!r} user "
            f"to run it as (installing the `postgresql` package creates one)"
        ) from None
    if guard:
        return [*guard, f"--reuid={USER}", f"--regid={USER}", "--init-groups", "--"]
    if shutil.which("runuser"):
        return ["runuser", "-u", USER, "--"]
    raise Unavailable("running as root, and neither setpriv nor runuser is there to drop it")


def _initdb(bindir: Path, root: Path, prefix: list[str]) -> None:
    cmd = [
        *prefix,
        str(bindir / "initdb"),
        "-D",
        str(root / "data"),
        "-U",
        USER,
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
        "--no-instructions",
    ]
    try:
        subprocess.run(
            cmd,
            cwd=root,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            check=True,
        )
    except subprocess.CalledProcessError as e:
        raise RuntimeError(
            f"initdb failed (exit code {e.returncode}):\n{e.stdout}\n{e.stderr}"
        ) from None


def _spawn(bindir: Path, root: Path, port: int, prefix: list[str]) -> subprocess.Popen[bytes]:
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": str(root / "sock"),
        "fsync": "off",  # throwaway data: durability costs time and buys nothing here
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "50",
        "logging_collector": "off",
    }
    cmd = [*prefix, str(bindir / "postgres"), "-D", str(root / "data")]
    for k, v in settings.items():
        cmd += ["-c", f"{k}={v}"]
    with open(root / "server.log", "ab") as log:  # the child keeps its own copy of the fd
        return subprocess.Popen(
            cmd, cwd=root, env=_clean_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )


def _wait_ready(server: PostgresServer) -> bool:
    """True once a connection succeeds; False if the server exited or time ran out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server._proc.poll() is not None:
            return False
        try:
            with server.connect(connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            time.sleep(0.05)
    return False
